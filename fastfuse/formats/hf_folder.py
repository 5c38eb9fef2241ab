"""The JSON files of a Hugging Face model folder that go with its weights: bytes in, dicts out.

Reads ``config.json``, ``generation_config.json`` and the tokens of ``tokenizer.json`` (the
model's vocabulary with the added tokens, by id, as ``tokenizer.get_vocab()`` lists them) with
errors that name the file and the option that supplies another folder. What a target makes of
them is its rules' business (``fastfuse.planning.ctranslate2``).

Example:
    >>> import json, tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     _ = pathlib.Path(folder, "config.json").write_text(json.dumps({"vocab_size": 3}))
    ...     HFFolder(pathlib.Path(folder), "--tokenizer-from").json("config.json")
    {'vocab_size': 3}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastfuse.errors import FuseFileNotFoundError, MalformedFileError

__all__ = ["HFFolder"]


@dataclass(frozen=True)
class HFFolder:
    """A folder of Hugging Face files; ``option`` is how a user names another one (for messages)."""

    path: Path
    option: str

    def file(self, name: str) -> Path:
        """The path of ``name`` in the folder; FuseFileNotFoundError naming it and the option."""
        path = self.path / name
        if not path.is_file():
            raise FuseFileNotFoundError(
                f"{path}: not found; the CTranslate2 model needs {name} from the Hugging Face folder "
                f"of this model: pass that folder with {self.option}"
            )
        return path

    def json(self, name: str, *, required: bool = True) -> dict[str, Any] | None:
        """The JSON object in ``name`` (``None`` if absent and not required)."""
        if not required and not (self.path / name).is_file():
            return None
        path = self.file(name)
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise MalformedFileError(f"{path}: not a readable JSON file ({exc})") from None
        if not isinstance(value, dict):
            raise MalformedFileError(f"{path}: expected a JSON object, found {type(value).__name__}")
        return value

    def tokens(self) -> list[str]:
        """``tokenizer.json``'s tokens ordered by id: the model vocabulary, then the added tokens."""
        tokenizer = self.json("tokenizer.json")
        assert tokenizer is not None
        path = self.path / "tokenizer.json"
        try:
            vocab = tokenizer["model"]["vocab"]
            ids = dict(vocab) if isinstance(vocab, dict) else {piece[0]: i for i, piece in enumerate(vocab)}
            for added in tokenizer.get("added_tokens", []):
                ids.setdefault(added["content"], added["id"])
            return [token for token, _ in sorted(ids.items(), key=lambda item: item[1])]
        except (KeyError, TypeError, IndexError) as exc:
            raise MalformedFileError(f"{path}: expected model.vocab and added_tokens ({exc!r})") from None
