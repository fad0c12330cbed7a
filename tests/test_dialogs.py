import json

import pytest

from tinygpt.data.dialogs import Message, chatterbot_english, detect_format, read_dialogs, write_dialogs
from tinygpt.errors import TinyGPTError, UsageError


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_jsonl(path, *objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    return path


def chat(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


def roles(conv):
    return [m.role for m in conv]


def test_jsonl_keeps_roles_and_drops_what_cannot_train(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl",
                    chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "  "),
                         ("assistant", "Hello")),
                    chat(("user", "only a question")))
    p.write_text(p.read_text(encoding="utf-8") + "\n\n", encoding="utf-8")  # trailing blank lines are fine
    assert read_dialogs(p) == [[Message("system", "Be brief."), Message("user", "Hi"),
                                Message("assistant", "Hello")]]


@pytest.mark.parametrize("line, problem", [
    ('{"messages": [', "invalid JSON"),
    ('{"turns": []}', '"messages"'),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "unknown role 'bot'"),
    ('{"messages": [{"role": "user"}]}', '"content"'),
    ('{"messages": [{"role": "user", "content": 3}]}', "must be a string"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, line, problem):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(chat(("user", "a"), ("assistant", "b"))) + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(TinyGPTError, match="bad.jsonl line 3") as e:
        read_dialogs(p)
    assert problem in str(e.value)


def test_chatterbot_alternates_and_keeps_scalars_as_written(tmp_path):
    p = tmp_path / "c.yml"
    p.write_text("categories: [x]\nconversations:\n"
                 "- - When was it?\n  - 1963\n  - Sure?\n  - yes\n"
                 "- - What time?\n  - 12:30\n"
                 "- lone string\n", encoding="utf-8")
    convs = read_dialogs(p)
    assert [[(m.role, m.content) for m in c] for c in convs] == [
        [("user", "When was it?"), ("assistant", "1963"), ("user", "Sure?"), ("assistant", "yes")],
        [("user", "What time?"), ("assistant", "12:30")]]


def test_bad_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("conversations:\n- - a\n  - b\n- [unclosed\n", encoding="utf-8")
    with pytest.raises(TinyGPTError, match=r"c\.yaml line \d+: invalid YAML"):
        read_dialogs(p)
    p.write_text("categories: [x]\n", encoding="utf-8")
    with pytest.raises(TinyGPTError, match="c.yaml: no `conversations:`"):
        read_dialogs(p)


def test_dailydialog_strips_utterances_and_keeps_spacing(tmp_path):
    p = tmp_path / "dialogues_text.txt"
    p.write_text(" Hello , how are you ? __eou__  Fine , thanks . __eou__ And you ? __eou__\n"
                 "\n"
                 "Only me . __eou__ __eou__\n"
                 "Bye ! __eou__ See you . __eou__\n", encoding="utf-8")
    assert read_dialogs(p) == [
        [Message("user", "Hello , how are you ?"), Message("assistant", "Fine , thanks ."),
         Message("user", "And you ?")],
        [Message("user", "Bye !"), Message("assistant", "See you .")]]


def test_detect_format(tmp_path):
    (tmp_path / "plain.txt").write_text("just prose\n", encoding="utf-8")
    (tmp_path / "dd.txt").write_text("a __eou__ b __eou__\n", encoding="utf-8")
    # beyond the sniffed head
    (tmp_path / "late.txt").write_text("x" * 70_000 + " __eou__\n", encoding="utf-8")
    assert [detect_format(tmp_path / n) for n in ("a.jsonl", "b.yml", "c.YAML", "dd.txt", "plain.txt",
                                                  "late.txt",
                                                 "notes.md")] == ["jsonl", "chatterbot", "chatterbot",
                                                                  "dailydialog",
                                                                  "text", "text", "text"]
    assert detect_format(tmp_path) == "dialogs-folder"
    prose = tmp_path / "prose"
    prose.mkdir()
    (prose / "book.txt").write_text("prose\n", encoding="utf-8")
    assert detect_format(prose) == "text"


def test_folder_reads_dialog_files_in_path_order_and_skips_others(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", chat(("user", "jsonl q"), ("assistant", "jsonl a")))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "c.yml").write_text("conversations:\n- [yaml q, yaml a]\n", encoding="utf-8")
    (tmp_path / "c.txt").write_text("dd q __eou__ dd a __eou__\n", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not a dialog\n", encoding="utf-8")
    (tmp_path / ".hidden.jsonl").write_text("not even json\n", encoding="utf-8")
    convs = read_dialogs(tmp_path)
    assert [c[0].content for c in convs] == ["yaml q", "jsonl q", "dd q"]
    assert [c[0].content for c in read_dialogs(tmp_path, "jsonl")] == ["jsonl q"]


def test_written_dialogs_read_back_unchanged(tmp_path):
    convs = [[Message("system", "Sé breve.\u2028"), Message("user", "{\"q\": 1}\n"),
              Message("assistant", "ok")]]
    write_dialogs(tmp_path / "out.jsonl", convs)
    assert read_dialogs(tmp_path / "out.jsonl") == convs


def test_nothing_to_read_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("prose\n", encoding="utf-8")
    for path in (tmp_path, tmp_path / "notes.txt"):
        with pytest.raises(TinyGPTError, match="no conversations in"):
            read_dialogs(path)
    with pytest.raises(TinyGPTError, match="does not exist"):
        read_dialogs(tmp_path / "missing.jsonl")
    with pytest.raises(UsageError, match="unknown dialog format"):
        read_dialogs(tmp_path, "csv")


@pytest.fixture
def datasets():
    return pytest.importorskip("datasets")  # optional dependency: only the hf tests need it


def save(datasets, tmp_path, columns, split=None):
    ds = datasets.Dataset.from_dict(columns)
    out = tmp_path / "ds"
    (datasets.DatasetDict({split: ds}) if split else ds).save_to_disk(str(out))
    return out


def test_hf_messages_column_by_name_and_by_detection(datasets, tmp_path):
    out = save(datasets, tmp_path, {"messages": [chat(("user", "q1"), ("assistant", "a1"))["messages"],
                                       chat(("assistant", "no question"))["messages"]]})
    assert detect_format(out) == "hf"
    expected = [[Message("user", "q1"), Message("assistant", "a1")]]
    assert read_dialogs(out, "hf") == expected
    assert read_dialogs(out) == expected


def test_hf_dialog_and_context_response_columns(datasets, tmp_path):
    dialog = save(datasets, tmp_path / "d", {"dialog": [["Hi , you ? ", "Fine . ", "Good . "]]},
                  split="validation")
    assert [roles(c) for c in read_dialogs(dialog)] == [["user", "assistant", "user"]]
    assert read_dialogs(dialog)[0][1].content == "Fine ."
    pairs = save(datasets, tmp_path / "p", {"context": ["Can I?"], "response": ["Better not."],
                                            "safety": ["casual"]},
                 split="train")
    assert read_dialogs(pairs, "hf") == [[Message("user", "Can I?"), Message("assistant", "Better not.")]]


def test_hf_unsupported_columns_and_unreachable_hub(datasets, tmp_path, monkeypatch):
    out = save(datasets, tmp_path, {"text": ["a"], "label": [0]})
    with pytest.raises(TinyGPTError, match="columns text, label; supported are messages, dialog"):
        read_dialogs(out, "hf")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TinyGPTError, match="hub could not be reached.*save_to_disk"):
        read_dialogs("someone/some-dialogs", "hf")


def test_chatterbot_english():
    convs = chatterbot_english()
    assert len(convs) > 500
    assert all(c[0].role == "user" and roles(c)[:2] == ["user", "assistant"] for c in convs)
    assert [Message("user", "Hello"), Message("assistant", "Hi")] in convs
