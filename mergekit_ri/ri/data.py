"""Unlabeled auxiliary data for RI: model-ready batches from a file, a folder of images, text,
or Gaussian noise.

Sources: a `.safetensors` file with model-ready inputs under the key "inputs" (pixel values or
token ids; an optional "attention_mask"), read a batch at a time; a folder of images (.png,
.jpg, .jpeg, .bmp, .webp, searched recursively, sorted), preprocessed with the model's own image
processor when its folder has `preprocessor_config.json`, else resized to `image_size` and
normalised to [-1, 1]; a `.txt` (one example a line) or `.jsonl` (objects with a "text" field)
file tokenized with the base's tokenizer; or `gaussian`, noise of the model's input shape (the
paper's weakest source, still a gain).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import UserError
from .keys import (
    IMAGE_SUFFIXES,
    aux_path,
    expected_image_shape,
    file_fingerprint,
    image_files,
    image_processor,
    images_fingerprint,
    text_fingerprint,
)


@dataclass
class AuxiliaryData:
    """A source of input batches for one model input name, with a fingerprint for the cache."""

    input_name: str
    fingerprint: str
    tensors: dict[str, torch.Tensor] | None = None  # in-memory (text)
    file: Path | None = None  # lazily read (.safetensors)
    count: int = 0
    example_shape: tuple[int, ...] = ()  # gaussian
    images: ImageFolder | None = None  # decoded a batch at a time (or all at once when small)

    def batches(self, batch_size: int, steps: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """`steps` batches; a seeded random contiguous window each step (no whole-file loads), or
        for images a seeded random sample of the folder."""
        generator = torch.Generator().manual_seed(seed)
        if self.images is not None:
            size = min(batch_size, self.count)
            for _ in range(steps):
                picked = torch.randperm(self.count, generator=generator)[:size].sort().values.tolist()
                yield {self.input_name: self.images.load(picked)}
            return
        if self.example_shape:
            for _ in range(steps):
                yield {self.input_name: torch.randn((batch_size, *self.example_shape), generator=generator)}
            return
        size = min(batch_size, self.count)
        handle = safe_open(self.file, "pt") if self.file is not None else None
        for _ in range(steps):
            start = int(torch.randint(0, self.count - size + 1, (1,), generator=generator))
            if handle is not None:
                batch = {self.input_name: handle.get_slice("inputs")[start : start + size]}
                if "attention_mask" in handle.keys():
                    batch["attention_mask"] = handle.get_slice("attention_mask")[start : start + size]
            else:
                batch = {
                    self.input_name if k == "inputs" else k: v[start : start + size]
                    for k, v in self.tensors.items()
                }
            yield batch


def _check_inputs(where: str, shape: tuple[int, ...], dtype: torch.dtype, input_name: str, config) -> None:
    if not shape or shape[0] == 0:
        raise UserError(f"auxiliary data {where} is empty")
    if input_name == "pixel_values":
        expected = expected_image_shape(config)
        if expected is not None and tuple(shape[1:]) != expected:
            raise UserError(
                f"auxiliary data {where}: inputs have shape {list(shape)}, the model takes "
                f"pixel_values of shape [N, {', '.join(map(str, expected))}]"
            )
        if not dtype.is_floating_point:
            raise UserError(f"auxiliary data {where}: pixel_values must be floating point, not {dtype}")
    elif input_name == "input_ids" and (dtype.is_floating_point or len(shape) != 2):
        raise UserError(
            f"auxiliary data {where}: input_ids must be integers of shape [N, T], got {dtype} {list(shape)}"
        )


def load_auxiliary(
    spec: str,
    input_name: str,
    config,
    tokenizer_folder: Path | None,
    relative_to: Path | None,
    max_length: int,
    processor_folders: tuple[Path | None, ...] = (),
) -> AuxiliaryData:
    """The auxiliary source named by `spec`; `processor_folders` are searched in order for the
    model's `preprocessor_config.json` (image folders)."""
    if spec == "gaussian":
        shape = expected_image_shape(config)
        if input_name != "pixel_values" or shape is None:
            raise UserError(
                "auxiliary_data: gaussian needs an image model (pixel_values with image_size and "
                "num_channels in config.json); give a .safetensors or text file instead"
            )
        return AuxiliaryData(input_name, "gaussian", example_shape=shape)
    path = aux_path(spec, relative_to)
    if path.is_dir():
        return _from_images(path, input_name, config, processor_folders)
    if not path.is_file():
        raise UserError(f"auxiliary_data: file not found: {spec}")
    if path.suffix == ".safetensors":
        return _from_safetensors(path, input_name, config)
    if path.suffix in (".txt", ".jsonl"):
        return _from_text(path, input_name, tokenizer_folder, max_length)
    raise UserError(
        f"auxiliary_data {path}: use a .safetensors file (key 'inputs'), a folder of images, "
        "a .txt/.jsonl text file, or 'gaussian'"
    )


def _from_safetensors(path: Path, input_name: str, config) -> AuxiliaryData:
    try:
        with safe_open(path, "pt") as f:
            keys = list(f.keys())
            if "inputs" not in keys:
                raise UserError(
                    f"auxiliary data {path} has no tensor 'inputs' (it has: {', '.join(keys) or 'none'})"
                )
            sliced = f.get_slice("inputs")
            shape = tuple(sliced.get_shape())
            dtype = f.get_slice("inputs")[0:1].dtype if shape and shape[0] else torch.float32
    except UserError:
        raise
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise UserError(f"auxiliary data {path}: not a readable safetensors file ({exc})") from None
    _check_inputs(str(path), shape, dtype, input_name, config)
    _require_finite_file(path)
    return AuxiliaryData(input_name, file_fingerprint(path), file=path, count=shape[0])


SCAN_BYTES = 1 << 26  # rows of auxiliary data checked for NaN/Inf at a time


def first_non_finite(tensor: torch.Tensor) -> int | None:
    """Index along dim 0 of the first example holding NaN or Inf (None when all finite)."""
    if not tensor.dtype.is_floating_point or tensor.shape[0] == 0:
        return None
    bad = ~torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)
    return int(bad.nonzero()[0]) if bad.any() else None


def _require_finite_file(path: Path) -> None:
    """Refuse NaN/Inf in a .safetensors source now: RI would train (and cache) NaN experts on them.
    Streams a chunk of rows at a time, so the file is never loaded whole."""
    try:
        with safe_open(path, "pt") as f:
            for key in ("inputs", "attention_mask"):
                if key in f.keys():
                    _scan_rows(path, key, f.get_slice(key))
    except UserError:
        raise
    except Exception as exc:  # a file truncated after its header, say
        message = f"auxiliary data {path}: not a readable safetensors file ({exc})"
        raise UserError(message.replace("\n", " ")) from None


def _scan_rows(path: Path, key: str, sliced) -> None:
    shape = sliced.get_shape()
    if not shape or shape[0] == 0 or not sliced[0:1].dtype.is_floating_point:
        return
    rows = max(1, SCAN_BYTES // (4 * max(1, math.prod(shape[1:]))))
    for start in range(0, shape[0], rows):
        bad = first_non_finite(sliced[start : start + rows])
        if bad is not None:
            raise UserError(
                f"auxiliary data {path}: example {start + bad} of '{key}' holds NaN or Inf "
                "(RI would train non-finite experts on it)"
            )


def _from_text(path: Path, input_name: str, tokenizer_folder: Path | None, max_length: int) -> AuxiliaryData:
    if input_name != "input_ids":
        raise UserError(f"auxiliary data {path}: text needs a text model, this one takes {input_name}")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        try:
            lines = [
                json.loads(line)["text"] if line.lstrip().startswith("{") else json.loads(line)
                for line in lines
            ]
        except (ValueError, KeyError, TypeError):
            raise UserError(
                f"auxiliary data {path}: each line must be a JSON object with a 'text' field"
            ) from None
    if not lines:
        raise UserError(f"auxiliary data {path} is empty")
    if tokenizer_folder is None:
        raise UserError("auxiliary text data needs the base model's tokenizer files beside its config.json")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    encoded = tokenizer(
        lines, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    tensors = {"inputs": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    return AuxiliaryData(input_name, text_fingerprint(path, max_length), tensors=tensors, count=len(lines))


PRELOAD_BYTES = 1 << 30  # decode a folder once and keep it when its float32 pixels fit in this


class ImageFolder:
    """Images of a folder turned into model-ready pixel_values, a batch of files at a time.

    With a `preprocessor_config.json` the model's own image processor (AutoImageProcessor) does
    the work; without one, each image is converted to the model's channels (L, RGB or RGBA),
    resized to `image_size` (bilinear) and scaled to [0, 1], then normalised with mean = std = 0.5.
    Folders whose pixels fit in `PRELOAD_BYTES` are decoded once and kept in memory.
    """

    def __init__(
        self, folder: Path, files: list[Path], shape: tuple[int, ...], processor_folder: Path | None
    ) -> None:
        self.folder, self.files, self.shape, self.processor_folder = folder, files, shape, processor_folder
        self._processor = None
        self._all: torch.Tensor | None = None

    def __getstate__(self) -> dict:  # worker processes decode for themselves
        return {**self.__dict__, "_processor": None, "_all": None}

    def _mode(self) -> str:
        modes = {1: "L", 3: "RGB", 4: "RGBA"}
        return modes[self.shape[0]]

    def _open(self, path: Path):
        from PIL import Image

        try:
            with Image.open(path) as image:
                return image.convert(self._mode())
        except Exception as exc:  # PIL raises several types for damaged or foreign files
            raise UserError(
                f"auxiliary image {path} cannot be read ({type(exc).__name__}: {exc})".replace("\n", " ")
            ) from None

    def decode(self, indices: list[int]) -> torch.Tensor:
        images = [self._open(self.files[i]) for i in indices]
        if self.processor_folder is not None:
            if self._processor is None:
                from transformers import AutoImageProcessor

                self._processor = AutoImageProcessor.from_pretrained(self.processor_folder)
            try:
                pixels = self._processor(images=images, return_tensors="pt")["pixel_values"]
            except Exception as exc:
                raise UserError(
                    f"auxiliary images in {self.folder}: the image processor of {self.processor_folder} "
                    f"failed ({type(exc).__name__}: {exc})".replace("\n", " ")
                ) from None
            return self._finite(pixels.float(), indices)
        import numpy as np
        from PIL import Image

        height, width = self.shape[1:]
        arrays = [
            np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
            for image in images
        ]
        pixels = (
            torch.from_numpy(np.stack(arrays)).reshape(len(images), height, width, -1).permute(0, 3, 1, 2)
        )
        return (pixels / 255.0 - 0.5) / 0.5

    def _finite(self, pixels: torch.Tensor, indices: list[int]) -> torch.Tensor:
        """An image processor's output, refused if it holds NaN/Inf (a zero image_std, say)."""
        bad = first_non_finite(pixels)
        if bad is not None:
            raise UserError(
                f"auxiliary image {self.files[indices[bad]]}: the image processor of "
                f"{self.processor_folder} makes NaN or Inf pixels from it"
            )
        return pixels

    def load(self, indices: list[int]) -> torch.Tensor:
        if self._all is None and len(self.files) * math.prod(self.shape) * 4 <= PRELOAD_BYTES:
            self._all = torch.cat(
                [
                    self.decode(list(range(i, min(i + 256, len(self.files)))))
                    for i in range(0, len(self.files), 256)
                ]
            )
        if self._all is not None:
            return self._all[indices]
        return self.decode(indices)


def _from_images(
    folder: Path, input_name: str, config, processor_folders: tuple[Path | None, ...]
) -> AuxiliaryData:
    if input_name != "pixel_values":
        raise UserError(
            f"auxiliary data {folder}: a folder of images needs an image model, this one takes {input_name}"
        )
    shape = expected_image_shape(config)
    if shape is None:
        raise UserError(
            f"auxiliary data {folder}: images need image_size and num_channels in the model's config.json"
        )
    if shape[0] not in (1, 3, 4):
        raise UserError(
            f"auxiliary data {folder}: the model takes {shape[0]}-channel images; "
            "give a .safetensors file of pixel_values instead"
        )
    files = image_files(folder)
    if not files:
        raise UserError(
            f"auxiliary data {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}, searched recursively)"
        )
    from PIL import Image

    for path in files:  # headers only: a file that is not an image fails now, not mid-training
        try:
            with Image.open(path):
                pass
        except Exception as exc:
            raise UserError(f"auxiliary image {path} cannot be read ({type(exc).__name__})") from None
    processor = image_processor(processor_folders)
    images = ImageFolder(folder, files, shape, processor)
    first = images.decode([0])
    _check_inputs(
        f"{folder} (after preprocessing {files[0].name})", tuple(first.shape), first.dtype, input_name, config
    )
    fingerprint = images_fingerprint(folder, files, shape, processor)
    return AuxiliaryData(input_name, fingerprint, count=len(files), images=images)
