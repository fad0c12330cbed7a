"""tinygpt eval --tasks: lm-evaluation-harness on a run's own model and tokenizer (tinygpt.harness).

Everything here is offline: the tasks are YAML files beside a JSONL of items, read by the harness's own `json`
dataset loader, as a user without the Hub would write them. The references are the harness's accuracy
computed item by item from tinygpt's scores, a full forward pass over each text, `tinygpt sample`, and the
harness's own `hf` model on the run exported to transformers."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import MAT_WORDS, mat_text, tiny_flags, train_run
from tinygpt import run as tinygpt_run
from tinygpt.cli import main
from tinygpt.errors import TinyGPTError
from tinygpt.report.records import read_run

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the dev extra")
from lm_eval.api.instance import Instance  # noqa: E402

from tinygpt import harness  # noqa: E402

ADJ, NOUN = MAT_WORDS


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """What a machine without the Hub has: the harness's datasets come from local files only."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def mat_run(tmp_path_factory, name: str, *flags: str) -> Path:
    root = tmp_path_factory.mktemp(f"harness-{name}")
    return train_run(tmp_path_factory, root / name, "--data", str(mat_text(root)), *flags)


@pytest.fixture(scope="session")
def bpe_run(tmp_path_factory) -> Path:
    """A small model with a trained byte-level BPE tokenizer, on the same text as text_run."""
    return mat_run(tmp_path_factory, "bpe", "--tokenizer", "bpe", "--data.vocab_size", "300", *tiny_flags(**{
        "model.n_layer": 2, "model.n_embd": 64, "model.block_size": 64, "train.max_iters": 150,
        "train.batch_size": 8, "train.eval_interval": 150, "train.checkpoint_interval": 150}))


@pytest.fixture(scope="session")
def sp_run(tmp_path_factory) -> Path:
    """A SentencePiece run, trained for a moment: the boundary tests need its tokenizer, not its skill."""
    return mat_run(tmp_path_factory, "sp", "--tokenizer", "sentencepiece", "--data.vocab_size", "400",
                   *tiny_flags(**{"model.block_size": 32}))


def items(n: int = 32) -> list[dict]:
    """Four-way questions in HellaSwag's shape: a context, four endings of different lengths, a gold one."""
    rng = random.Random(0)
    out = []
    for i in range(n):
        a, b = rng.choice(ADJ), rng.choice(NOUN)
        endings = [f"{x} sat on mat number {rng.randrange(240)}" + "." * rng.randrange(1, 4)
                   for x in rng.sample(NOUN, 4)]
        out.append({"ctx": f"The {a}", "endings": endings, "label": rng.randrange(4),
                    "text": f"The {a} {b} sat on mat number {i}.", "prompt": f"The {a} {b} sat on"})
    return out


@pytest.fixture(scope="session")
def tasks(tmp_path_factory) -> Path:
    """A folder of three tasks (one per request type) over one JSONL file, for --include-path."""
    root = tmp_path_factory.mktemp("tasks")
    data = root / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items()))
    source = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
              "test_split: test\n")
    (root / "mc.yaml").write_text(
        f"task: local_mc\n{source}output_type: multiple_choice\ndoc_to_text: '{{{{ctx}}}}'\n"
        "doc_to_choice: '{{endings}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    (root / "roll.yaml").write_text(
        f"task: local_roll\n{source}output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n"
        "  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n")
    (root / "gen.yaml").write_text(
        f"task: local_gen\n{source}output_type: generate_until\ndoc_to_text: '{{{{prompt}}}}'\n"
        "doc_to_target: ' mat '\ngeneration_kwargs:\n  until: ['.', 'number']\n  max_gen_toks: 24\n"
        "  do_sample: false\nmetric_list:\n"
        "  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    (root / "hub.yaml").write_text(  # data on the Hub, which these tests never reach
        "task: local_hub\ndataset_path: no-such-org/no-such-dataset\ntest_split: test\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n")
    return root


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def lm_of(run: Path, batch_size: int = 16) -> harness.TinyGPTLM:
    return harness.TinyGPTLM(tinygpt_run.load(run, device="cpu", dtype="float32"), batch_size, progress=False)


# ---------------------------------------------------------------- the model interface


@pytest.mark.parametrize("run", ["text_run", "bpe_run"])
def test_accuracy_is_the_harness_scoring_of_tinygpts_own_log_likelihoods(run, tasks, request_fixture):
    """acc and acc_norm from `tinygpt eval --tasks` equal the argmax of choice_scores item by item (sum and
    per character), and the result lands in the run's eval/ and in `tinygpt report`."""
    path = request_fixture(run)
    summary = harness.run_tasks(tinygpt_run.load(path, device="cpu", dtype="float32"), ["local_mc"],
                                include_path=str(tasks), chat=False, log=lambda m: None)
    lm = lm_of(path)
    direct = [harness.choice_scores(lm, it["ctx"], it["endings"]) for it in items()]
    for metric, way in (("acc", "sum"), ("acc_norm", "per_char")):
        hits = [max(range(4), key=s[way].__getitem__) == it["label"] for s, it in zip(direct, items())]
        assert summary["results"]["local_mc"][metric] == pytest.approx(sum(hits) / len(hits), abs=1e-12)
    assert summary["samples"] == {"local_mc": 32}
    saved = json.loads(Path(summary["saved"]).read_text())
    assert saved["results"] == summary["results"] and Path(summary["saved"]).parent == path / "eval"
    rows = {(b["task"], b["metric"]): b["value"] for b in read_run(path).benchmarks}
    assert rows[("local_mc", "acc_norm")] == summary["results"]["local_mc"]["acc_norm"]


@pytest.fixture
def request_fixture(request):
    return request.getfixturevalue


@pytest.mark.parametrize("run", ["text_run", "bpe_run", "sp_run"])
def test_log_likelihoods_are_the_same_batched_and_one_at_a_time(run, request_fixture):
    path = request_fixture(run)
    reqs = [request("loglikelihood", it["ctx"], " " + e) for it in items(8) for e in it["endings"]]
    reqs += [request("loglikelihood", "", "The red cat"), request("loglikelihood", "The old ", "dog sat"),
             request("loglikelihood", "The old", "")]
    batched, alone = lm_of(path, 16).loglikelihood(reqs), lm_of(path, 1).loglikelihood(reqs)
    assert batched[-1] == alone[-1] == (0.0, True)  # an empty continuation: nothing to be unlikely
    for (a, greedy_a), (b, greedy_b) in zip(batched, alone):
        assert a == pytest.approx(b, abs=1e-5) and greedy_a == greedy_b
    assert len({round(s, 3) for s, _ in batched}) > len(reqs) // 2  # the scores are not all alike


@pytest.mark.parametrize("run", ["text_run", "bpe_run", "sp_run"])
def test_log_likelihood_is_a_full_forward_pass_over_the_text(run, request_fixture):
    """loglikelihood(ctx, cont) and loglikelihood_rolling(text) against the log-probabilities of one plain
    forward pass over end-of-text + the text's tokens."""
    path = request_fixture(run)
    lm = lm_of(path)
    text = "The shy owl sat on mat number 17."
    ids = [lm.tok.eot_id, *lm.tok.encode(text)]
    with torch.no_grad():
        logits, _ = lm.model(torch.tensor([ids[:-1]]))
    logprobs = F.log_softmax(logits[0].double(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])[0] == pytest.approx(
        logprobs.sum().item(), abs=1e-4)
    ctx, cont = lm.pair("The shy", " owl sat on mat number 17.")
    assert ctx + cont == ids[1:]  # the continuation: the whole text's tokens after the context's
    with torch.no_grad():  # a context that is not empty is not preceded by end-of-text
        logits, _ = lm.model(torch.tensor([ids[1:-1]]))
    logprobs = F.log_softmax(logits[0].double(), -1).gather(1, torch.tensor(ids[2:])[:, None])[:, 0]
    got = lm.loglikelihood([request("loglikelihood", "The shy ", "owl sat on mat number 17.")])[0][0]
    assert got == pytest.approx(logprobs[len(ctx) - 1:].sum().item(), abs=1e-4)


def test_rolling_windows_cover_a_text_longer_than_the_context(text_run):
    """A text of 3.5 context windows, scored as the harness's `hf` model does: blocks of block_size tokens,
    each token once, seeing the tokens since its block's start (and the one before); the last, partial block
    sees a full window. Here the reference scores each token alone from the context that rule gives it."""
    lm = lm_of(text_run)
    text = "".join(f"The {a} {b} sat on mat number {i}.\n" for i, (a, b) in enumerate(zip(ADJ * 2, NOUN * 2)))
    ids = lm.tok.encode(text[:224])
    n, L = len(ids), lm.block
    assert 3 * L < n < 4 * L
    padded, expected = [lm.tok.eot_id] + ids, 0.0  # padded[j] is the token before ids[j]
    with torch.no_grad():
        for j in range(n):
            block = j // L
            start = 0 if block == 0 else n - L if block == n // L else block * L  # in padded
            logits, _ = lm.model(torch.tensor([padded[start:j + 1]]))
            expected += F.log_softmax(logits[0, -1].double(), -1)[ids[j]].item()
    got = lm.loglikelihood_rolling([request("loglikelihood_rolling", text[:224])])[0]
    assert got == pytest.approx(expected, abs=1e-3)


def test_a_character_a_char_run_never_saw(text_run):
    """Left out of a context; a continuation holding one can never be written: -inf, not an error."""
    lm = lm_of(text_run)
    with pytest.raises(TinyGPTError):
        lm.tok.encode("ü")
    (bad, greedy), (ok, _) = lm.loglikelihood([request("loglikelihood", "The red", " cat ü"),
                                                request("loglikelihood", "The ü red", " cat")])
    assert bad == float("-inf") and not greedy
    assert ok == pytest.approx(lm.loglikelihood([request("loglikelihood", "The  red", " cat")])[0][0])


@pytest.mark.parametrize("run", ["text_run", "bpe_run"])
def test_generation_is_what_tinygpt_sample_writes_greedily(run, request_fixture, capsys):
    path = request_fixture(run)
    prompts = [it["prompt"] for it in items(4)]
    got = lm_of(path, 3).generate_until(
        [request("generate_until", p, {"until": ["number"], "max_gen_toks": 24, "do_sample": False})
         for p in prompts])
    for prompt, text in zip(prompts, got):
        capsys.readouterr()
        assert main(["sample", "--run", str(path), "--prompt", prompt, "--temperature", "0",
                     "--max-new-tokens", "24", "--device", "cpu"]) == 0
        sampled = capsys.readouterr().out[len(prompt):].rstrip("\n")
        assert sampled.startswith(text) and "number" not in text
        assert sampled[len(text):].startswith("number") or sampled == text  # cut at the stop string only
    assert any(text for text in got)


def test_every_request_type_through_the_cli(text_run, tasks, capsys):
    assert main(["eval", "--run", str(text_run), "--tasks", "local_mc,local_roll,local_gen",
                 "--include-path", str(tasks), "--limit", "8", "--json", "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == {"local_mc": 8, "local_roll": 8, "local_gen": 8}
    assert 0 < summary["results"]["local_roll"]["bits_per_byte"] < 8
    assert summary["results"]["local_gen"]["exact_match"] == 1.0  # "The red cat sat on" + " mat " + "number"


def test_chat_runs_get_their_template(chat_run, tasks):
    """A chat run's prompts are wrapped in its template (as `tinygpt chat` would send them), and a reply ends
    at the template's end-of-reply marker."""
    lm = lm_of(chat_run)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "user", "content": "2 plus 3?"}]
    text = lm.apply_chat_template(history)
    ids, _ = lm.template.render(lm.tok, [harness_message(m) for m in history], open_reply=True)
    assert lm.tok.encode(text, allow_special=True) == ids
    summary = harness.run_tasks(tinygpt_run.load(chat_run, device="cpu", dtype="float32"),
                                ["local_mc", "local_gen"], limit=4, include_path=str(tasks),
                                log=lambda m: None)
    assert summary["settings"]["chat_template"] is True
    assert set(summary["results"]) == {"local_mc", "local_gen"}
    lm.chat = True
    reply = lm.generate_until([request("generate_until", text, {"until": ["\n\n\n"], "max_gen_toks": 40})])[0]
    assert "<|end|>" not in reply and "<|user|>" not in reply


def harness_message(m: dict):
    from tinygpt.data.dialogs import Message

    return Message(m["role"], m["content"])


# ---------------------------------------------------------------- references no one here wrote


def test_llm_c_hellaswag_scoring_agrees(bpe_run):
    """llm.c's HellaSwag scoring, written out here as it does it (each ending's tokens after the context's,
    cross-entropy of the ending's tokens from one forward pass per row): its summed loss picks what the
    harness's acc picks, its mean loss per token what choice_scores' per_token picks. The harness's acc_norm
    divides by characters instead, which picks the same ending on most items, not all (docs/evaluation.md
    says how they relate)."""
    lm = lm_of(bpe_run)
    agree_sum = agree_tok = agree_norm = 0
    for it in items():
        rows = [(lm.tok.encode(it["ctx"]), lm.tok.encode(" " + e)) for e in it["endings"]]
        losses = []
        with torch.no_grad():
            for ctx, end in rows:
                tokens = torch.tensor([ctx + end])
                logits, _ = lm.model(tokens[:, :-1])
                ce = F.cross_entropy(logits[0].double(), tokens[0, 1:], reduction="none")[len(ctx) - 1:]
                losses.append((ce.sum().item(), ce.mean().item()))
        scores = harness.choice_scores(lm, it["ctx"], it["endings"])
        assert [-s for s in scores["sum"]] == pytest.approx([x for x, _ in losses], abs=1e-4)
        pick = lambda xs: min(range(4), key=xs.__getitem__)  # noqa: E731
        agree_sum += pick([x for x, _ in losses]) == pick([-s for s in scores["sum"]])
        agree_tok += pick([m for _, m in losses]) == pick([-s for s in scores["per_token"]])
        agree_norm += pick([m for _, m in losses]) == pick([-s for s in scores["per_char"]])
    assert agree_sum == agree_tok == len(items())
    assert agree_norm >= len(items()) // 2


def test_the_harness_hf_model_on_the_exported_run_gives_the_same_numbers(bpe_run, tasks, tmp_path):
    """The harness's own transformers model (`hf`) on `tinygpt export --format hf`: the same log-likelihoods
    for every request type, and the same accuracy."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    out = tmp_path / "hf"
    assert main(["export", "--run", str(bpe_run), "--format", "hf", "--out", str(out)]) == 0
    lm = lm_of(bpe_run)
    hf = HFLM(pretrained=str(out), device="cpu", dtype="float32", max_length=lm.block, batch_size=4)
    reqs = [request("loglikelihood", it["ctx"], " " + e) for it in items(6) for e in it["endings"]]
    reqs += [request("loglikelihood", "", "The red cat"), request("loglikelihood", "The old ", "dog sat")]
    ours, theirs = lm.loglikelihood(reqs), hf.loglikelihood(reqs)
    assert [s for s, _ in ours] == pytest.approx([s for s, _ in theirs], abs=1e-4)
    assert [g for _, g in ours] == [g for _, g in theirs]
    text = "".join(f"The {a} {b} sat on mat number {i}.\n" for i, (a, b) in enumerate(zip(ADJ * 2, NOUN)))
    rolled = [request("loglikelihood_rolling", text)]
    assert lm.loglikelihood_rolling(rolled)[0] == pytest.approx(hf.loglikelihood_rolling(rolled)[0], abs=1e-3)
    manager = harness.task_manager(("local_mc",), str(tasks))
    theirs = simple_evaluate(model=hf, tasks=["local_mc"], task_manager=manager, limit=16)["results"]
    ours = harness.run_tasks(tinygpt_run.load(bpe_run, device="cpu", dtype="float32"), ["local_mc"], limit=16,
                             include_path=str(tasks), log=lambda m: None)["results"]
    for metric in ("acc", "acc_norm"):
        assert ours["local_mc"][metric] == theirs["local_mc"][f"{metric},none"]


# ---------------------------------------------------------------- refusals


def test_an_unknown_task_is_one_line_naming_how_to_list_them(text_run, tasks, capsys):
    assert main(["eval", "--run", str(text_run), "--tasks", "local_mc,hellaswagg",
                 "--include-path", str(tasks)]) == 2
    err = capsys.readouterr().err.strip()
    assert "'hellaswagg'" in err and "lm-eval ls tasks" in err and len(err.splitlines()) == 1


def test_data_out_of_reach_is_one_line_naming_the_offline_way(text_run, tasks, capsys):
    assert main(["eval", "--run", str(text_run), "--tasks", "local_hub", "--include-path", str(tasks)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: the tasks' data could not be loaded") and "--include-path" in err


def test_flags_that_go_with_tasks(text_run, capsys):
    assert main(["eval", "--run", str(text_run), "--num-fewshot", "2"]) == 2
    assert "--num-fewshot goes with --tasks" in capsys.readouterr().err


def test_a_missing_extra_names_its_install_command(text_run):
    """Without lm-eval installed, one line saying what to install (simulated: the import fails)."""
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "from tinygpt.cli import main\n"
            f"sys.exit(main(['eval', '--run', {str(text_run)!r}, '--tasks', 'hellaswag']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "pip install 'tinygpt[eval]'" in done.stderr and "Traceback" not in done.stderr
