"""The saved processor answers `post_process_generation` the Florence-2 way, for the tiny and the real layout."""

from __future__ import annotations

import pytest
from transformers import AutoProcessor, BartTokenizerFast, CLIPImageProcessorPil, Florence2Processor

from florence_ops.modeling import save_processor
from tests.conftest import REPO

REFERENCE = (
    REPO.parent / "shared" / "reference" / "florence-2-base-ft"
)  # the real checkpoint's tokenizer and preprocessor files
pytestmark = pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"{REFERENCE} (Florence-2-base-ft's files) is absent")


def reference_processor(**kwargs) -> Florence2Processor:
    """The processor the original checkpoint's files give: tokenizer and image processor, no post-processor config."""
    tokenizer = BartTokenizerFast.from_pretrained(REFERENCE, extra_special_tokens={"image_token": "<image>"})
    return Florence2Processor(CLIPImageProcessorPil.from_pretrained(REFERENCE), tokenizer, **kwargs)


def test_processor_in_the_real_checkpoint_layout_post_processes_docvqa(tmp_path):
    save_processor(reference_processor(), tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    ids = reloaded.tokenizer("INV-0042 <loc_12>")["input_ids"]  # <s> ... </s>, as generate returns it
    text = reloaded.batch_decode([ids], skip_special_tokens=False)[0]
    answer = reloaded.post_process_generation(text, task="<DocVQA>", image_size=(768, 768))
    assert answer == {"<DocVQA>": "INV-0042 <loc_12>"}
    boxes = reloaded.post_process_generation(
        "</s><s>car<loc_0><loc_0><loc_499><loc_999></s>", task="<OD>", image_size=(1000, 1000)
    )
    assert boxes["<OD>"]["labels"] == ["car"] and len(boxes["<OD>"]["bboxes"]) == 1


def test_existing_post_processor_entries_are_kept(tmp_path):
    # A converted checkpoint's processor carries its own entries, e.g. the words phrase grounding ignores.
    banned = {"phrase_grounding": {"banned_grounding_tokens": ["the image"]}}
    save_processor(reference_processor(post_processor_config=banned), tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert reloaded.post_processor_config["phrase_grounding"] == banned["phrase_grounding"]
    assert reloaded.post_processor_config["pure_text"] == {}
