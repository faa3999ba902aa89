"""Build a tiny random BLIP captioning model on disk, for tests (needs torch + transformers)."""

from __future__ import annotations

from pathlib import Path

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "a", "photo", "of", "the", "cat", "dog", "on", "in", "with", "red", "blue",
    "green", "tree", "house", "car", "man", "woman", "sky", "street", "table",
]  # fmt: skip
IMAGE_SIZE = 32
# With the default 0.02 the image barely reaches the text decoder and every picture gets the
# same caption; 0.2 makes captions depend on the picture, so tests can tell results apart.
INIT_RANGE = 0.2


def build_tiny_blip(folder: Path, *, seed: int = 0) -> Path:
    """Save a ~100k-parameter BLIP (model + processor) in `folder` and return it.

    Loadable by path with BlipProcessor / BlipForConditionalGeneration.from_pretrained.
    The weights are random but seeded, so its captions are the same on every run.
    """
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join([*SPECIAL, *WORDS, "[DEC]"]) + "\n")
    # transformers 5 ignores vocab_file=; "[DEC]" must be the start token of captions.
    tokenizer = BertTokenizer(vocab=str(vocab), bos_token="[DEC]")
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)

    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2}
    config = BlipConfig(
        text_config={
            **small,
            "num_attention_heads": 4,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 64,
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "eos_token_id": tokenizer.sep_token_id,
            "initializer_range": INIT_RANGE,
        },
        vision_config={
            **small,
            "num_attention_heads": 4,
            "image_size": IMAGE_SIZE,
            "patch_size": 8,
            "initializer_range": INIT_RANGE,
        },
        projection_dim=32,
        image_text_hidden_size=32,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
