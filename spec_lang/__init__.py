"""The resharding spec language: YAML specs that say how a framework's rank-local tensors hold logical tensors.

A leaf layer: it imports only the standard library, ``yaml`` and ``ckpt.errors``. ``load_spec`` parses and
validates a spec into a ``Spec`` (pure data, JSON round-trip); ``check`` reports rules that match no key and keys
that match no rule; ``shipped_spec`` loads the specs shipped for the GPT/Llama/Mixtral families in Megatron naming.
The layouts themselves are computed by ``resharding.spec_layout``. Reference: docs/spec-language.md.
"""

from spec_lang.check import CheckReport, RuleRef, check
from spec_lang.expr import Expr, split_count, split_start
from spec_lang.loader import load_spec
from spec_lang.model import (PARALLEL_SIZES, RANK_NAMES, SPEC_VERSION, Bucket, DimDecl, Fused, FusedPart, Group,
                             IndexDecl, LetDecl, ParamRule, PlainRule, Replicated, Shard, Spec, StateRule, Tied,
                             ZeroSpec)
from spec_lang.shipped import SHIPPED, match_shipped, shipped_spec, shipped_spec_text
from spec_lang.where import Where, spec_error

__all__ = [
    "load_spec", "check", "CheckReport", "RuleRef", "match_shipped", "shipped_spec", "shipped_spec_text", "SHIPPED",
    "Spec",
    "ParamRule", "StateRule", "PlainRule", "Replicated", "Shard", "Fused", "FusedPart", "Tied", "ZeroSpec",
    "Bucket", "Group", "DimDecl", "LetDecl", "IndexDecl", "Expr", "Where", "spec_error", "split_count",
    "split_start", "SPEC_VERSION", "PARALLEL_SIZES", "RANK_NAMES",
]
