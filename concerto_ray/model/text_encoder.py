"""CLIP text embeddings of class names: the language side of Point Prompt Training (Pointcept's PPT).

The reference embeds every dataset's class names with OpenAI's CLIP text tower (`clip.load("ViT-B/16")`,
`encode_text`, L2-normalised, in fp32 on the CPU) and scales the point-class similarities by CLIP's `logit_scale`.
Here the same tower comes through `transformers` (`CLIPModel.get_text_features`; "ViT-B/16" is the hub's
"openai/clip-vit-base-patch16"), from a local directory written by save_pretrained, an s3:// copy of one, or a hub
name, fetched on the node that loads it (as the DINOv2 weights are).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from concerto_ray.errors import ConfigError
from concerto_ray.node_cache import local_copy


@dataclass
class ClassText:
    embeddings: torch.Tensor  # (sum of num_classes, projection dim), unit rows, the datasets' classes one after another
    num_classes: list[int]  # classes per dataset, in the order of the datasets
    logit_scale: torch.Tensor  # CLIP's (log) temperature, a 0-d tensor


@torch.no_grad()
def class_text_embeddings(
    weights: str,
    class_names: Sequence[Sequence[str]],
    template: str = "[x]",
    *,
    field: str = "ppt.clip_model",
    endpoint_url: str | None = None,
) -> ClassText:
    """The normalised text embeddings of `template` with "[x]" replaced by each class name, per dataset."""
    try:
        path = str(local_copy(weights, endpoint_url, field=field))
        model = CLIPModel.from_pretrained(path).float().eval()
        tokenizer = CLIPTokenizer.from_pretrained(path)
    except OSError as exc:
        raise ConfigError(f"{field}: cannot load a CLIP model and tokenizer from {weights!r}: {exc}") from exc
    embeddings = []
    for names in class_names:
        tokens = tokenizer([template.replace("[x]", name) for name in names], padding=True, return_tensors="pt")
        features = model.get_text_features(**tokens)
        # transformers 5 returns the projected pooled output inside a model output, earlier versions as a tensor
        features = features if isinstance(features, torch.Tensor) else features.pooler_output
        embeddings.append(features / features.norm(dim=-1, keepdim=True))
    return ClassText(
        embeddings=torch.cat(embeddings),
        num_classes=[len(names) for names in class_names],
        logit_scale=model.logit_scale.detach().clone(),
    )


def write_random_clip(folder: str | Path, seed: int = 0) -> Path:
    """A tiny CLIP with random weights and a byte-level tokenizer without merges (every character one token), saved
    with save_pretrained: what tests and offline demos load in place of the hub's weights."""
    folder = Path(folder)
    vocab = {char: i for i, char in enumerate(_byte_chars())}
    vocab.update({f"{char}</w>": len(vocab) + i for i, char in enumerate(_byte_chars())})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    special = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            **special,
        ),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _byte_chars() -> list[str]:
    """The 256 printable characters that byte-level BPE (GPT-2's, CLIP's) stands for the bytes 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    codes = dict(zip(printable, printable)) | {b: 256 + i for i, b in enumerate(others)}
    return [chr(codes[b]) for b in range(256)]
