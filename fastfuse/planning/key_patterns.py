"""Which scheme a checkpoint's keys follow, and its layers: rules' key templates as regexes.

``detect`` scores every (scheme, prefix) by the keys its per-layer groups match (one regex call
per key and candidate); ``present`` and ``layer_count`` read one group. Names in, answers out:
no shapes, no data.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

from fastfuse.aliases import TensorLike
from fastfuse.errors import FuseError, MissingTensorError, SchemeNotDetectedError
from fastfuse.planning import rules

__all__ = ["detect", "layer_count", "present"]


def present(tensors: Mapping[str, TensorLike], rule: rules.GroupRule, prefix: str) -> bool:
    """Does the checkpoint hold (the first part of) ``rule``'s group? Validates nothing."""
    if rule.per_layer:
        pattern = _regex(rule.source, prefix, rule.parts)
        return any(pattern.fullmatch(key) for key in tensors)
    keys = (t.format(prefix=prefix, part=rule.parts[0], kind="weight") for t in rule.sources)
    return any(key in tensors for key in keys)


def detect(tensors: Mapping[str, TensorLike], scheme: str) -> tuple[rules.Scheme, str]:
    """The (scheme, prefix) whose per-layer groups match the most keys."""
    if scheme == "auto":
        candidates = rules.SCHEMES
    else:
        try:
            candidates = (rules.scheme_by_name(scheme),)
        except KeyError:
            raise SchemeNotDetectedError(
                f"unknown scheme {scheme!r}; expected 'auto' or one of {[s.name for s in rules.SCHEMES]}"
            ) from None
    scores = {}
    keys = list(tensors)
    for candidate in candidates:
        for prefix in candidate.prefixes:
            hits = len(list(filter(_per_layer_keys(candidate, prefix).fullmatch, keys)))
            if hits:
                scores[(candidate, prefix)] = hits
    if not scores:
        sample = ", ".join(repr(k) for k in list(tensors)[:3]) or "none"
        known = "; ".join(
            f"{s.name} ({s.groups[0].source.format(prefix=s.prefixes[0], i=0, part=s.groups[0].parts[0], kind='weight')})"
            for s in candidates
        )
        raise SchemeNotDetectedError(
            f"no fusion scheme matches the {len(tensors)} keys (first: {sample}); expected keys like: {known}"
        )
    best = max(scores.values())
    winners = [pair for pair, hits in scores.items() if hits == best]
    if len(winners) > 1:
        found = ", ".join(f"{s.name} with prefix {p!r}" for s, p in winners)
        raise SchemeNotDetectedError(f"ambiguous checkpoint: keys match {found} equally; pass scheme= explicitly")
    return winners[0]


@functools.lru_cache(maxsize=256)
def _regex(template: str, prefix: str, parts: tuple[str, ...]) -> re.Pattern[str]:
    """Compile a source template: ``{i}`` captures digits, ``{part}`` and ``{kind}`` alternatives."""
    return re.compile(_pattern(template, prefix, parts, named=True))


def _pattern(template: str, prefix: str, parts: tuple[str, ...], *, named: bool) -> str:
    pieces = re.split(r"(\{prefix\}|\{i\}|\{part\}|\{kind\})", template)

    def group(name: str, body: str) -> str:
        return f"(?P<{name}>{body})" if named else f"(?:{body})"

    groups = {
        "{prefix}": re.escape(prefix),
        "{i}": group("i", r"\d+"),
        "{part}": group("part", "|".join(re.escape(p) for p in parts)),
        "{kind}": group("kind", "weight|bias"),
    }
    return "".join(groups.get(piece, re.escape(piece)) for piece in pieces)


@functools.lru_cache(maxsize=64)
def _per_layer_keys(scheme: rules.Scheme, prefix: str) -> re.Pattern[str]:
    """One pattern matching a key of any per-layer group of ``scheme`` (one match per key: what
    detection counts, in a single regex call per key)."""
    alternatives = (_pattern(g.source, prefix, g.parts, named=False) for g in scheme.groups if g.per_layer)
    return re.compile("|".join(f"(?:{a})" for a in alternatives))


def layer_count(tensors: Mapping[str, TensorLike], rule: rules.GroupRule, prefix: str, *, required: bool) -> int:
    """Layers ``0..n-1`` of a per-layer group, checking indices are canonical and gap-free."""
    pattern = _regex(rule.source, prefix, rule.parts)
    indices = set()
    for key in tensors:
        match = pattern.fullmatch(key)
        if match:
            text = match.group("i")
            if str(int(text)) != text:
                raise FuseError(f"{key!r}: layer index {text!r} is not canonical; expected {int(text)!r}")
            indices.add(int(text))
    if not indices and required:
        missing = rule.source.format(prefix=prefix, i=0, part=rule.parts[0], kind="weight")
        raise MissingTensorError(f"{rule.option}=True but the checkpoint has no {rule.name} group: missing {missing!r}")
    count = max(indices) + 1 if indices else 0
    for i in range(count):
        if i not in indices:
            missing = rule.source.format(prefix=prefix, i=i, part=rule.parts[0], kind="weight")
            raise MissingTensorError(f"missing tensor {missing!r}: layers run 0..{count - 1} but layer {i} is absent")
    return count
