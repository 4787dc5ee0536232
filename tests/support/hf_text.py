"""model=hf and dataset=text without the network (tests/test_hf_text.py, and README "Hugging
Face models and text": `python -m tests.support.hf_text <dir>` writes the example's files): a tiny BERT and its tokenizer, built from a
transformers config and a `tokenizers` WordLevel model trained on the test's own texts, saved
with save_pretrained into a directory (what `model.name_or_path` points at), and a generated
two-class text file whose classes use distinct words (so a model can learn it) among shared
filler words (so no single position gives the class away)."""

from __future__ import annotations

import atexit
import csv
import json
import shutil
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

CLASS_WORDS = {
    "neg": ["bad", "awful", "poor", "sad", "angry", "dark", "cold", "harsh"],
    "pos": ["good", "great", "fine", "nice", "happy", "bright", "warm", "calm"],
}
FILLER = ["the", "a", "day", "was", "movie", "it", "very", "and", "so", "we"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
# BERT: hidden 32, 2 layers of 2 heads; LoRA r=4 on query and value: 2 layers x 2 modules x
# (A: 4 x 32 + B: 32 x 4) = 1024 adapter values; the head (classifier 32 -> 2) 66 values.
HIDDEN, LAYERS = 32, 2


def texts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (text, label) rows, labels alternating neg/pos: 2 class words and 4 fillers each."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = "neg" if i % 2 == 0 else "pos"
        words = list(rng.choice(CLASS_WORDS[label], 2)) + list(rng.choice(FILLER, 4))
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_tiny_model(directory: str | Path) -> Path:
    """A 2-layer BERT base model (no task head, as distilbert-base-uncased ships) and a
    WordLevel tokenizer over this module's words, both saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    directory = Path(directory)
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [" ".join(w) for w in (*CLASS_WORDS.values(), FILLER)]
    tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")), ("[SEP]", tokenizer.token_to_id("[SEP]"))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    config = BertConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
        pad_token_id=tokenizer.token_to_id("[PAD]"),
        # no dropout: it draws from torch's global generator, which the training loop does not
        # seed, so a test's figures would depend on what ran before it in the process
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def write_tiny_vit(directory: str | Path) -> Path:
    """A 2-layer ViT base model for digits' 1x8x8 images (4x4 patches), saved with
    save_pretrained: model=hf's image path (AutoModelForImageClassification)."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,  # as in write_tiny_model
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ViTModel(config).save_pretrained(directory)
    return Path(directory)


def write_text_set(path: str | Path, n: int, seed: int = 0, rows=None) -> Path:
    """`texts(n, seed)` (or `rows`) as a .csv (header text,label) or .jsonl file."""
    path = Path(path)
    rows = texts(n, seed) if rows is None else rows
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    else:
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(rows)
    return path


@lru_cache(maxsize=1)
def shared_files() -> tuple[Path, Path]:
    """(model directory, 200-row train.csv), written once per test process into a temporary
    directory removed at exit: for tests that only compose configs (tests/test_config.py)."""
    root = Path(tempfile.mkdtemp(prefix="hf-text-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return write_tiny_model(root / "tiny-bert"), write_text_set(root / "train.csv", 200)


def text_overrides() -> str:
    """What dataset=text and model=hf need to compose: the shared files, declared classes."""
    model, train = shared_files()
    return (f"model=hf model.name_or_path={model} dataset=text dataset.path={train} "
            f"dataset.classes=[neg,pos] dataset.tokenizer={model}")  # fmt: skip


def main(out: str) -> None:
    """The README example's files: <out>/tiny-bert (model and tokenizer), <out>/train.csv (400
    texts) and <out>/test.csv (100 others, the server's)."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tiny_model(out_dir / "tiny-bert")
    write_text_set(out_dir / "train.csv", 400, seed=0)
    write_text_set(out_dir / "test.csv", 100, seed=1)
    print(f"wrote {out_dir}/tiny-bert, {out_dir}/train.csv and {out_dir}/test.csv")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/hf-text")
