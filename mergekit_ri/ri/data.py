"""Unlabeled auxiliary data for RI: model-ready batches from a file, text, or Gaussian noise.

Sources: a `.safetensors` file with model-ready inputs under the key "inputs" (pixel values or
token ids; an optional "attention_mask"), read a batch at a time; a `.txt` (one example a line)
or `.jsonl` (objects with a "text" field) file tokenized with the base's tokenizer; or
`gaussian`, noise of the model's input shape (the paper's weakest source, still a gain).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import UserError


@dataclass
class AuxiliaryData:
    """A source of input batches for one model input name, with a fingerprint for the cache."""

    input_name: str
    fingerprint: str
    tensors: dict[str, torch.Tensor] | None = None  # in-memory (text)
    file: Path | None = None  # lazily read (.safetensors)
    count: int = 0
    example_shape: tuple[int, ...] = ()  # gaussian

    def batches(self, batch_size: int, steps: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """`steps` batches; a seeded random contiguous window each step (no whole-file loads)."""
        generator = torch.Generator().manual_seed(seed)
        if self.example_shape:
            for _ in range(steps):
                yield {self.input_name: torch.randn((batch_size, *self.example_shape), generator=generator)}
            return
        size = min(batch_size, self.count)
        handle = safe_open(self.file, "pt") if self.file is not None else None
        for _ in range(steps):
            start = int(torch.randint(0, self.count - size + 1, (1,), generator=generator))
            if handle is not None:
                batch = {self.input_name: handle.get_slice("inputs")[start:start + size]}
                if "attention_mask" in handle.keys():
                    batch["attention_mask"] = handle.get_slice("attention_mask")[start:start + size]
            else:
                batch = {self.input_name if k == "inputs" else k: v[start:start + size] for k, v in self.tensors.items()}
            yield batch


def expected_image_shape(config) -> tuple[int, ...] | None:
    size = getattr(config, "image_size", None)
    channels = getattr(config, "num_channels", None)
    if size is None or channels is None:
        return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (channels, h, w)


def _check_inputs(where: str, shape: tuple[int, ...], dtype: torch.dtype, input_name: str, config) -> None:
    if not shape or shape[0] == 0:
        raise UserError(f"auxiliary data {where} is empty")
    if input_name == "pixel_values":
        expected = expected_image_shape(config)
        if expected is not None and tuple(shape[1:]) != expected:
            raise UserError(f"auxiliary data {where}: inputs have shape {list(shape)}, the model takes "
                            f"pixel_values of shape [N, {', '.join(map(str, expected))}]")
        if not dtype.is_floating_point:
            raise UserError(f"auxiliary data {where}: pixel_values must be floating point, not {dtype}")
    elif input_name == "input_ids" and (dtype.is_floating_point or len(shape) != 2):
        raise UserError(f"auxiliary data {where}: input_ids must be integers of shape [N, T], got {dtype} {list(shape)}")


def load_auxiliary(spec: str, input_name: str, config, tokenizer_folder: Path | None,
                   relative_to: Path | None, max_length: int) -> AuxiliaryData:
    if spec == "gaussian":
        shape = expected_image_shape(config)
        if input_name != "pixel_values" or shape is None:
            raise UserError("auxiliary_data: gaussian needs an image model (pixel_values with image_size and "
                            "num_channels in config.json); give a .safetensors or text file instead")
        return AuxiliaryData(input_name, "gaussian", example_shape=shape)
    path = Path(spec).expanduser()
    if not path.exists() and relative_to is not None and (relative_to / path).exists():
        path = relative_to / path
    if not path.is_file():
        raise UserError(f"auxiliary_data: file not found: {spec}")
    if path.suffix == ".safetensors":
        return _from_safetensors(path, input_name, config)
    if path.suffix in (".txt", ".jsonl"):
        return _from_text(path, input_name, tokenizer_folder, max_length)
    raise UserError(f"auxiliary_data {path}: use a .safetensors file (key 'inputs'), a .txt/.jsonl text file, or 'gaussian'")


def _from_safetensors(path: Path, input_name: str, config) -> AuxiliaryData:
    try:
        with safe_open(path, "pt") as f:
            keys = list(f.keys())
            if "inputs" not in keys:
                raise UserError(f"auxiliary data {path} has no tensor 'inputs' (it has: {', '.join(keys) or 'none'})")
            sliced = f.get_slice("inputs")
            shape = tuple(sliced.get_shape())
            dtype = f.get_slice("inputs")[0:1].dtype if shape and shape[0] else torch.float32
    except UserError:
        raise
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise UserError(f"auxiliary data {path}: not a readable safetensors file ({exc})") from None
    _check_inputs(str(path), shape, dtype, input_name, config)
    stat = path.stat()
    fingerprint = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return AuxiliaryData(input_name, fingerprint, file=path, count=shape[0])


def _from_text(path: Path, input_name: str, tokenizer_folder: Path | None, max_length: int) -> AuxiliaryData:
    if input_name != "input_ids":
        raise UserError(f"auxiliary data {path}: text needs a text model, this one takes {input_name}")
    lines = [l for l in path.read_text().splitlines() if l.strip()]
    if path.suffix == ".jsonl":
        try:
            lines = [json.loads(l)["text"] if l.lstrip().startswith("{") else json.loads(l) for l in lines]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"auxiliary data {path}: each line must be a JSON object with a 'text' field") from None
    if not lines:
        raise UserError(f"auxiliary data {path} is empty")
    if tokenizer_folder is None:
        raise UserError("auxiliary text data needs the base model's tokenizer files beside its config.json")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    encoded = tokenizer(lines, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    tensors = {"inputs": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    fingerprint = hashlib.sha256(path.read_bytes() + str(max_length).encode()).hexdigest()
    return AuxiliaryData(input_name, fingerprint, tensors=tensors, count=len(lines))
