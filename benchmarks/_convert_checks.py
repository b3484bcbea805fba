"""The equality checks of ``benchmarks.convert``: converted checkpoints against the peers' outputs, tensor by tensor.

Called once per case after the timed repeats, on the last repeat's outputs; each returns plain data (tensors
compared, mismatches listed) for the report. ``torch.equal`` throughout: bit-identical or not, no tolerance.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import torch


def _trusted_load(path: str) -> Any:
    obj = torch.load(path, map_location="cpu", weights_only=False)  # written by DeepSpeed in this run: trusted
    return obj["param"] if isinstance(obj, dict) and "param" in obj else obj


def check_deepspeed(ours_dir: str, theirs_dir: str, stage: int) -> dict[str, Any]:
    """Every fp32 weight, exp_avg, exp_avg_sq and step of ours against ``ds_to_universal``'s ``zero/`` files.

    ZeRO-3: ``ds_to_universal`` writes no ``step.pt``; the per-group steps are in ``zero/optimizer_state.pt``.
    Values are compared flattened: its ZeRO-3 tensors are 1-D (counted in ``shape_differs``).
    """
    from formats.foreign import open_source

    zero = os.path.join(theirs_dir, "zero")
    theirs = sorted(d for d in os.listdir(zero) if os.path.isdir(os.path.join(zero, d)))
    bad: list[str] = []
    compared = shape_differs = 0
    with open_source(ours_dir, "universal") as src:
        ours = sorted(k[len("model/"):] for k in src.tensors if k.startswith("model/"))
        if ours != theirs:
            bad.append(f"parameters: only ours {sorted(set(ours) - set(theirs))[:5]}, "
                       f"only ds_to_universal {sorted(set(theirs) - set(ours))[:5]}")
        group = {v: int(k.split("/")[2]) for k, v in src.values.items()
                 if k.startswith("optim/param_groups/") and "/params/" in k}
        steps3: list[Any] = []
        if stage == 3:
            st = torch.load(os.path.join(zero, "optimizer_state.pt"), map_location="cpu", weights_only=False)
            per_group = st["optimizer_state_dict"]["state"]
            steps3 = [per_group[g]["step"] for g in sorted(per_group)]
        for name in sorted(set(ours) & set(theirs)):
            for state, key in (("fp32", f"model/{name}"), ("exp_avg", f"optim/state/{name}/exp_avg"),
                               ("exp_avg_sq", f"optim/state/{name}/exp_avg_sq"), ("step", f"optim/state/{name}/step")):
                path = os.path.join(zero, name, f"{state}.pt")
                if state == "step" and stage == 3:
                    want = torch.as_tensor(steps3[group[name]])
                elif os.path.exists(path):
                    want = torch.as_tensor(_trusted_load(path))
                else:
                    bad.append(f"{name}: ds_to_universal wrote no {state}.pt")
                    continue
                if key not in src.tensors:
                    bad.append(f"{name}: ours has no {key}")
                    continue
                got = src.read(key)
                if got.dtype != want.dtype or got.numel() != want.numel() or not torch.equal(got.reshape(-1),
                                                                                             want.reshape(-1)):
                    bad.append(f"{key}: {got.dtype}{tuple(got.shape)} differs from {path} "
                               f"{want.dtype}{tuple(want.shape)}")
                shape_differs += tuple(got.shape) != tuple(want.shape)
                compared += 1
    opt = os.path.join(zero, "optimizer_state.pt")
    return {"ours": ours_dir, "theirs": theirs_dir, "parameters": len(ours), "tensors_compared": compared,
            "shape_differs": shape_differs, "mismatches": bad[:20], "equal": not bad and compared > 0,
            "theirs_optimizer_state_pt_bytes": os.path.getsize(opt) if os.path.exists(opt) else None}


def safetensors_index(root: str) -> dict[str, str]:
    from safetensors import safe_open

    out = {}
    for path in sorted(glob.glob(os.path.join(root, "*.safetensors"))):
        with safe_open(path, "pt") as f:
            out.update(dict.fromkeys(f.keys(), path))
    return out


def check_safetensors(ours_dir: str, ref_dir: str) -> dict[str, Any]:
    """Every tensor of the safetensors output ``ours_dir`` against the one ``ref_dir`` holds, read by safetensors."""
    from safetensors import safe_open

    a, b = safetensors_index(ours_dir), safetensors_index(ref_dir)
    bad = [f"keys: only in {ours_dir}: {sorted(set(a) - set(b))[:5]}, only in {ref_dir}: {sorted(set(b) - set(a))[:5]}"
           ] if set(a) != set(b) else []
    compared = 0
    for k in sorted(set(a) & set(b)):
        with safe_open(a[k], "pt") as fa, safe_open(b[k], "pt") as fb:
            x, y = fa.get_tensor(k), fb.get_tensor(k)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            bad.append(f"{k}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
        compared += 1
    return {"ours": ours_dir, "theirs": ref_dir, "tensors_compared": compared, "mismatches": bad[:20],
            "equal": not bad and compared > 0}
