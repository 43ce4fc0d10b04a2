"""The recipe's `tokenizer:` section and `chat_template`, in mergekit 0.1.5's syntax.

Kept apart from recipe.py so that the vocabulary feature is one package: the schema here, the
tokenizer build in `build`, the row maps in `remap`, the plan hook in `plan`.
"""

from __future__ import annotations

from importlib import resources
from typing import Literal, Union

from ..schema import ConfigDict, Field, Record, StrictInt, model_validator

MAX_PAD_MULTIPLE = 1 << 20


class ModelTokenEmbedding(Record):
    """A token's row taken from one model's row for `token` (or `token_id`) in its own vocabulary."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["model_token"]
    model: str
    token_id: StrictInt | None = Field(None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ModelTokenEmbedding:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id or token (as in mergekit)")
        return self


class ZeroEmbedding(Record):
    """A token's row of zeros."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["zero"]


class TokenEmbeddingConfig(Record):
    """Where one output token's embedding comes from; `force` uses `source` even for the models
    that have the token themselves."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: Union[ModelTokenEmbedding, ZeroEmbedding, str, None] = None
    force: bool = False


class TokenizerConfig(Record):
    """mergekit's `tokenizer:` section. Its `source` defaults to `union`, as in mergekit."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: str = "union"
    tokens: dict[str, TokenEmbeddingConfig] | None = None
    pad_to_multiple_of: StrictInt | None = Field(None, ge=1, le=MAX_PAD_MULTIPLE)


TEMPLATE_NAMES = ("alpaca", "chatml", "exaone", "llama3", "mistral")


def named_template(name: str) -> str | None:
    """The text of one of mergekit's named chat templates, or None if `name` is not one."""
    if name not in TEMPLATE_NAMES:
        return None
    return resources.files(__package__).joinpath("chat_templates", f"{name}.jinja").read_text()


def check_chat_template(value: str | None) -> str | None:
    """mergekit's rule: `auto`, a template name, or Jinja text (20 characters or more, with '{')."""
    if value is None or value == "auto" or named_template(value) is not None:
        return value
    if len(value) < 20 or "{" not in value:
        raise ValueError(
            f"'{value[:40]}' is neither auto, a template name ({', '.join(TEMPLATE_NAMES)}) nor a "
            "Jinja template (at least 20 characters with '{')"
        )
    return value
