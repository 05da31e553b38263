"""The growth schedules of benches/efficiency.py: the built-in ones, reading a JSON file of
schedules, and turning a schedule into a plan for one final model (the starting config and each
growth step's step number and specs). The format is in efficiency.py's docstring.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: Built-in growth schedules; sizes are fractions of the final model.
SCHEDULES: dict[str, dict[str, Any]] = {
    "depth": {
        "about": "1/3 of the layers; +1/3 at 10 % and at 30 % of the tokens, zero-initialised at the middle (exact)",
        "stages": [[0, {"layers": 1 / 3}], [0.1, {"layers": 2 / 3}], [0.3, {"layers": 1}]],
        "init": {"depth": "zero"}, "policy": "middle",
    },
    "depth-stack": {
        "about": "as depth, but new layers repeat the trained stack on top (G_stack; not exact)",
        "stages": [[0, {"layers": 1 / 3}], [0.1, {"layers": 2 / 3}], [0.3, {"layers": 1}]],
        "init": {"depth": "stack"}, "policy": "stack",
    },
    "depth-masked": {
        "about": "as depth, new layers random behind a mask that ramps in over 5 % of the steps (MSG; exact)",
        "stages": [[0, {"layers": 1 / 3}], [0.1, {"layers": 2 / 3}], [0.3, {"layers": 1}]],
        "init": {"depth": "masked"}, "policy": "middle", "ramp_fraction": 0.05,
    },
    "both-compute-optimal": {
        "about": "as both, but each step comes when the tokens since the last one reach 2 x the current "
                 "non-embedding parameters (the compute-optimal trigger; Staged Training's idea of growing "
                 "once the small model has had its share)",
        "stages": [[0, {"layers": 1 / 3, "ffn": 0.5}], [None, {"layers": 2 / 3, "ffn": 0.5}],
                   [None, {"layers": 1, "ffn": 1}]],
        "init": {"depth": "zero", "ffn": "split"}, "policy": "middle",
        "trigger": {"name": "compute-optimal", "tokens_per_parameter": 2.0},
    },
    "width": {
        "about": "FFN at 1/4 of its width, doubled at 10 % and at 30 % of the tokens by splitting units (exact)",
        "stages": [[0, {"ffn": 0.25}], [0.1, {"ffn": 0.5}], [0.3, {"ffn": 1}]],
        "init": {"ffn": "split"},
    },
    "both": {
        "about": "1/3 of the layers and half the FFN; the layers grow at 10 % and 30 %, the FFN at 30 % (exact)",
        "stages": [[0, {"layers": 1 / 3, "ffn": 0.5}], [0.1, {"layers": 2 / 3, "ffn": 0.5}],
                   [0.3, {"layers": 1, "ffn": 1}]],
        "init": {"depth": "zero", "ffn": "split"}, "policy": "middle",
    },
}
DEFAULT_SCHEDULES = "depth"
#: What a schedule may hold (the module docstring says what each does).
SCHEDULE_KEYS = {"about", "stages", "init", "policy", "init_settings", "ramp_fraction", "trigger",
                 "new_param_lr_multiplier", "warmup_steps", "rewarm_steps"}


def _size(final: int, fraction: float) -> int:
    return max(1, min(final, round(final * fraction)))


def plan(schedule: dict[str, Any], final: dict[str, Any], steps: int, tokens_per_step: int) -> dict[str, Any]:
    """A schedule made concrete for the final model: the starting config and the growth steps."""
    stages = schedule["stages"]
    if not stages or stages[0][0] not in (0, None):
        raise ValueError("a schedule's first stage must be at 0 (the starting model)")
    layers, ffn = final["num_hidden_layers"], final["intermediate_size"]
    sizes = [(_size(layers, s.get("layers", 1)), _size(ffn, s.get("ffn", 1))) for _, s in stages]
    if sizes[-1] != (layers, ffn):
        raise ValueError(f"a schedule must end at the final model ({layers} layers, FFN {ffn}); it ends at "
                         f"{sizes[-1][0]} layers, FFN {sizes[-1][1]}")
    init, policy = schedule.get("init", {}), schedule.get("policy")
    init_settings = dict(schedule.get("init_settings", {}))
    if "ramp_fraction" in schedule:  # masked init: the ramp as a share of the run
        init_settings.setdefault("depth", {"ramp_steps": max(1, round(schedule["ramp_fraction"] * steps))})
        init_settings.setdefault("ffn", {"ramp_steps": max(1, round(schedule["ramp_fraction"] * steps))})
    events = []
    for (at, _), (l0, f0), (l1, f1) in zip(stages[1:], sizes, sizes[1:]):
        if schedule.get("trigger"):
            step = None  # the trigger decides when
        elif at is None or not 0 < at < 1:
            raise ValueError(f"growth stages must lie strictly inside the budget (0 < fraction < 1), not {at}")
        else:
            step = max(1, round(at * steps))
        specs = []
        if f1 != f0:
            specs.append(_spec("ffn", {"add": f1 - f0}, init, init_settings))
        if l1 != l0:
            depth = {"num_layers": l1 - l0, **({"policy": policy} if policy else {})}
            specs.append(_spec("depth", depth, init, init_settings))
        if l1 < l0 or f1 < f0:
            raise ValueError("a schedule may only grow")
        events.append({"step": step, "tokens": None if step is None else step * tokens_per_step, "specs": specs})
    start = dict(final, num_hidden_layers=sizes[0][0], intermediate_size=sizes[0][1])
    start["min_layers"] = 1
    return {"start": start, "events": events}


def _spec(axis: str, extra: dict[str, Any], init: dict[str, str], init_settings: dict[str, Any]) -> dict[str, Any]:
    spec = {"axis": axis, **extra}
    if axis in init:
        spec["init"] = init[axis]
    if axis in init_settings:
        spec["init_settings"] = init_settings[axis]
    return spec


def read_json(path: str, flag: str) -> Any:
    """The JSON file ``path`` that option ``flag`` names; a missing or malformed file is a ValueError."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{flag} {path}: no such file")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{flag} {path}: not valid JSON ({exc})") from None


def load_schedules(text: str) -> dict[str, dict[str, Any]]:
    if text.endswith(".json") or Path(text).is_file():
        data = read_json(text, "--schedules")
        if not isinstance(data, dict) or not data or not all(isinstance(v, dict) for v in data.values()):
            raise ValueError(f"--schedules {text}: expected an object of named schedules")
        for name, schedule in data.items():
            unknown = sorted(set(schedule) - SCHEDULE_KEYS)
            if unknown:
                raise ValueError(f"--schedules {text}: schedule {name!r} has unknown key "
                                 f"{', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(SCHEDULE_KEYS))}")
            stages = schedule.get("stages")
            if not isinstance(stages, list) or not all(isinstance(st, list) and len(st) == 2 and
                                                       isinstance(st[1], dict) for st in stages):
                raise ValueError(f"--schedules {text}: schedule {name!r} needs \"stages\": a list of "
                                 "[fraction, {\"layers\": ..., \"ffn\": ...}] pairs")
        return data
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCHEDULES]
    if unknown or not names:
        raise ValueError(f"--schedules: unknown schedule {', '.join(unknown) or '(none)'}; allowed: "
                         f"{', '.join(SCHEDULES)}, or a JSON file")
    return {n: SCHEDULES[n] for n in names}
