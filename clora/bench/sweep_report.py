"""What `clora bench experiments` writes: the JSON (the claim), a markdown table with the verdict,
and a PNG of times and reward curves, side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def _verdict(r: dict) -> str:
    if r.get("noninferior") is None:
        return "-"
    bounds = r["noninferiority_lower_bounds"]
    return (f"{'non-inferior' if r['noninferior'] else 'FAIL'} (LB {bounds['steps_1_on']:+.3f} / "
            f"{bounds['last_3']:+.3f}, max z {max(r['per_step_z']):.2f}, false fail {r['false_fail_rate']:.1%})")


def _paired(r: dict) -> str:
    d = r.get("mean_paired_differences")
    return f"{d['steps_1_on']:+.3f} / {d['last_3']:+.3f}" if d else "-"


COLUMNS: list[tuple[str, Callable[[dict], str]]] = [
    ("N", lambda r: str(r["n"])),
    ("cold serial s (start+run)", lambda r: f"{r['serial_s']} (stop {r['stop_s']:.1f} each)"),
    ("warm serial s", lambda r: str(r["warm_serial_s"])), ("concurrent s", lambda r: str(r["concurrent_s"])),
    ("x cold", lambda r: str(r["throughput_ratio"])), ("x warm", lambda r: str(r["warm_throughput_ratio"])),
    ("step s", lambda r: str(r["mean_step_s"])),
    ("rollout / train / publish s",
     lambda r: f"{r['mean_rollout_s']:.1f} / {r['mean_training_s']:.1f} / {r['mean_publish_s']:.1f}"),
    ("step x N=1", lambda r: str(r["step_time_ratio"])),
    ("engine / trainer busy", lambda r: f"{r['mean_engine_busy']:.0%} / {r['mean_trainer_busy']:.0%}"),
    ("backward passes conc / serial", lambda r: f"{r['backward_passes']['concurrent']} / {r['backward_passes']['serial']}"),
    ("reward step 0 -> last 3", lambda r: f"{r['reward_first']:.3f} -> {r['reward_last']:.3f}"),
    ("paired diff steps 1-9 / last 3", _paired), ("verdict", _verdict),
    ("max gap (sd)", lambda r: str(r["max_reward_gap_sd"])),
]


def markdown(result: dict) -> str:
    lines = ["| " + " | ".join(title for title, _ in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r) for _, cell in COLUMNS) + " |" for r in result["rows"]]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    ns = [r["n"] for r in rows]
    fig, (times, rewards) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label in (("serial_s", "cold serial"), ("warm_serial_s", "warm serial"), ("concurrent_s", "concurrent")):
        times.plot(ns, [r[key] for r in rows], marker="o", label=label)
    times.set(title="Time to finish N experiments", xlabel="N experiments", ylabel="seconds", xticks=ns)
    serial = rows[0]["serial_reward_per_step"]
    rewards.plot(range(len(serial)), [m for m, _ in serial], color="black", lw=2, label="serial (measured)")
    for r in rows:
        rewards.plot(range(len(r["reward_per_step"])), [m for m, _ in r["reward_per_step"]], marker=".",
                     label=f"concurrent N={r['n']}")
    rewards.set(title="Sampled reward per step (mean over experiments)", xlabel="step", ylabel="reward")
    for ax in (times, rewards):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['model']}, {result['environment']}, {result['steps']} steps, group {result['group_size']}: "
                 f"{result['machine'][:70]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out: Path) -> tuple[Path, Path, Path]:
    """JSON (the claim), the markdown table and the PNG, side by side."""
    out.parent.mkdir(parents=True, exist_ok=True)
    table, png = out.with_suffix(".md"), out.with_suffix(".png")
    out.write_text(json.dumps(result, indent=2) + "\n")
    table.write_text(markdown(result) + "\n")
    plot(result, png)
    return out, table, png
