"""The built-in corpus (tinygpt.data.corpus): held-out skill items never reach training, and the seed decides
all."""

from tinygpt.data import corpus


def test_held_out_items_never_appear_in_the_synthetic_conversations():
    convs = corpus.synthetic_conversations(3000, seed=0)
    asked = {m.content for c in convs for m in c if m.role == "user"}
    for skill in corpus.HELD_OUT_SKILLS:
        held = corpus.skill_items(skill, held_out=True)
        seen = corpus.skill_items(skill, held_out=False)
        assert held and seen and not {q for q, _ in held} & {q for q, _ in seen}
        assert not asked & {q for q, _ in held}, skill
    assert corpus.skill_items("capital", held_out=True) == []  # facts cannot be guessed: all are taught


def test_the_corpus_is_the_same_for_a_seed_and_differs_between_seeds():
    assert corpus.synthetic_conversations(50, seed=1) == corpus.synthetic_conversations(50, seed=1)
    assert corpus.synthetic_conversations(50, seed=1) != corpus.synthetic_conversations(50, seed=2)
    held = [q for q, _ in corpus.skill_items("addition", held_out=True)]
    assert len(held) == 80 and "what is 13 plus 5?" not in held  # the README's demo question is a seen one
