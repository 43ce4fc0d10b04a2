"""Tiny Llama-style checkpoints with known task vectors, for the demo, tests and benchmarks.

Written the way Hugging Face writes them (config.json + one or several safetensors shards with
an index), so `transformers` loads them and every input path of ri-merge is exercised, without
needing `transformers` to make them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class LlamaShape:
    vocab: int = 256
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, self.hidden)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            shapes.update(
                {
                    p + "input_layernorm.weight": (self.hidden,),
                    p + "self_attn.q_proj.weight": (self.hidden, self.hidden),
                    p + "self_attn.k_proj.weight": (kv, self.hidden),
                    p + "self_attn.v_proj.weight": (kv, self.hidden),
                    p + "self_attn.o_proj.weight": (self.hidden, self.hidden),
                    p + "post_attention_layernorm.weight": (self.hidden,),
                    p + "mlp.gate_proj.weight": (self.intermediate, self.hidden),
                    p + "mlp.up_proj.weight": (self.intermediate, self.hidden),
                    p + "mlp.down_proj.weight": (self.hidden, self.intermediate),
                }
            )
        shapes["model.norm.weight"] = (self.hidden,)
        shapes["lm_head.weight"] = (self.vocab, self.hidden)
        return shapes

    def config(self, dtype: str) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "torch_dtype": dtype,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def base_weights(shape: LlamaShape, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, dims in shape.tensor_shapes().items():
        if len(dims) == 1:
            weights[name] = torch.ones(dims)
        else:
            weights[name] = torch.randn(dims, generator=generator) * 0.02
    return weights


def expert_weights(base: dict[str, torch.Tensor], seed: int, scale: float = 0.005) -> dict[str, torch.Tensor]:
    """Base + a dense random task vector (heavy-tailed, so magnitudes differ as in real fine-tunes)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in base.items():
        noise = torch.randn(tensor.shape, generator=generator)
        out[name] = tensor + scale * noise * noise.abs()
    return out


def finetune_weights(
    base: dict[str, torch.Tensor], seed: int, rank: int = 8, update: float = 0.02, noise: float = 0.005
) -> dict[str, torch.Tensor]:
    """Base + what a real fine-tune changes: a rank-`rank` update at `update` × each matrix's std
    plus dense noise at `noise` × std. Stored in bf16, such deltas take few distinct values, so a
    TIES threshold sits inside a block of tied magnitudes and zero sums are common — what real
    experts do to a merge and heavy-tailed continuous noise does not."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in base.items():
        std = float(tensor.float().std()) if tensor.numel() > 1 else 1.0
        delta = noise * std * torch.randn(tensor.shape, generator=generator)
        if tensor.dim() == 2:
            left = torch.randn(tensor.shape[0], rank, generator=generator)
            right = torch.randn(rank, tensor.shape[1], generator=generator)
            low_rank = left @ right
            delta += update * std * low_rank / float(low_rank.std())
        out[name] = tensor + delta
    return out


def save_checkpoint(
    folder: Path,
    weights: dict[str, torch.Tensor],
    config: dict | None,
    dtype: str = "bfloat16",
    shards: int = 1,
) -> Path:
    """Write `weights` as HF safetensors (sharded with an index when shards > 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    cast = {k: v.to(TORCH_DTYPES[dtype]).contiguous() for k, v in weights.items()}
    names = list(cast)
    if shards <= 1:
        save_file(cast, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        per = -(-len(names) // shards)
        weight_map = {}
        for index in range(shards):
            part = names[index * per : (index + 1) * per]
            file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: cast[k] for k in part}, folder / file, metadata={"format": "pt"})
            weight_map.update({k: file for k in part})
        total = sum(t.numel() * t.element_size() for t in cast.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    if config is not None:
        (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}, indent=2))
    return folder


def make_family(
    root: Path,
    names: list[str],
    shape: LlamaShape = LlamaShape(),
    dtype: str = "bfloat16",
    shards: int = 1,
    seed: int = 0,
) -> dict[str, Path]:
    """A base and one expert per name under `root`; returns their folders (key 'base' too)."""
    base = base_weights(shape, seed)
    config = shape.config(dtype)
    folders = {"base": save_checkpoint(root / "base", base, config, dtype, shards)}
    for i, name in enumerate(names):
        folders[name] = save_checkpoint(
            root / name, expert_weights(base, seed + 1 + i), config, dtype, shards
        )
    return folders


def save_lora_adapter(
    folder: Path,
    base: dict[str, torch.Tensor],
    targets: list[str],
    r: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    embeddings: tuple[str, ...] = (),
    replaced: tuple[str, ...] = (),
    **config,
) -> dict[str, torch.Tensor]:
    """A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors, PEFT's key
    names) for the modules `targets` (and embedding modules `embeddings`, whole new tensors for
    `replaced`, as modules_to_save stores them); returns the base with the adapter merged by the
    formula, in fp32: W + scale·B·A, scale = alpha/r (alpha/√r with use_rslora), transposed for
    fan_in_fan_out and embeddings."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    merged = {k: v.float().clone() for k, v in base.items()}
    tensors = {}
    for module in [*targets, *embeddings]:
        weight = base[f"{module}.weight"]
        embedding = module in embeddings
        transpose = embedding or config.get("fan_in_fan_out", False)
        fan_out, fan_in = (weight.shape[1], weight.shape[0]) if transpose else weight.shape
        lora_a = torch.randn(r, fan_in, generator=generator) * 0.1
        lora_b = torch.randn(fan_out, r, generator=generator) * 0.1
        delta = lora_b @ lora_a
        merged[f"{module}.weight"] += (delta.T if transpose else delta) * scale
        if embedding:
            tensors[f"base_model.model.{module}.lora_embedding_A"] = lora_a
            tensors[f"base_model.model.{module}.lora_embedding_B"] = lora_b
        else:
            tensors[f"base_model.model.{module}.lora_A.weight"] = lora_a
            tensors[f"base_model.model.{module}.lora_B.weight"] = lora_b
    for name in replaced:
        new = torch.randn(base[name].shape, generator=generator) * 0.02
        tensors[f"base_model.model.{name}"] = new
        merged[name] = new.clone()
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    settings = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets, **config}
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    return merged


def tiny_tokenizer(letters: str, seed: int = 0, added: tuple[str, ...] = (), size: int = 200) -> Any:
    """A `size`-token byte-level BPE tokenizer (transformers' fast tokenizer) trained offline on
    random words over `letters`, plus `added` tokens (ids size, size + 1, ...): real tokenizer
    files for tests and parity runs of different vocabularies. Needs transformers."""
    import random

    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(400)]
    text = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        text, trainers.BpeTrainer(vocab_size=size, special_tokens=["<unk>", "<s>", "</s>"])
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if added:
        fast.add_tokens(list(added))
    if len(fast) != size + len(added):
        raise RuntimeError(f"trained {len(fast) - len(added)} tokens, not {size}: give more letters")
    return fast
