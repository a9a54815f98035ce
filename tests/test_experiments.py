"""The offline diagnostics of experiments/ (the end-to-end call is in distributed/test_train)."""

from experiments.diagnose_gap import canonical_caption
from gckd_ray.data.synthetic import CAPTION_STYLES


def test_canonical_caption_writes_synonyms_back_as_source_words():
    synonyms = dict(CAPTION_STYLES["icfg"].synonyms)
    text = ("The young woman is dressed in a crimson blouse over denim pants and gray sneakers. "
            "She has short pants? No: a Lady with a rucksack.")
    assert canonical_caption(text, synonyms) == (
        "The woman is dressed in a red shirt over jeans and grey shoes. "
        "She has shorts? No: a woman with a backpack.")
    assert canonical_caption("A man in red jeans.", synonyms) == "A man in red jeans."
