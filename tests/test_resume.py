"""Resumption: checkpoint (state_dicts + the global RNG state), a fresh interpreter, train
on: bitwise the uninterrupted run."""
import subprocess
import sys
import textwrap

import torch

from helpers import assert_states_bitwise_equal, bitwise_equal

RESUME_SCRIPT = textwrap.dedent(
    '''
    """Train, checkpoint, resume: `python resume.py MODE CHECKPOINT OUT`.

    MODE "first": the uninterrupted run of every configuration, then, from scratch again,
    the run up to its checkpoint (written atomically). MODE "resume": a fresh process that
    waits for the checkpoint, loads it and trains on to the end.
    """
    import os
    import sys
    import time

    import torch
    import torch.nn.functional as F

    from vqkernels import Quantizer

    # (not under torch.use_deterministic_algorithms: on CPU it changes nothing here, and it
    # imports torch._inductor, seconds per interpreter)
    MODE, CKPT, OUT = sys.argv[1:4]
    STEPS = 7
    CONFIGS = {  # name: (Quantizer options, step after which the checkpoint is taken)
        "ema": (dict(init="kmeans", kmeans_iters=3, dead_code_threshold=1.0), 3),
        "deferred-mid-continuous": (dict(deferred_steps=4, reservoir_size=40, dead_code_threshold=1.0), 2),
        "deferred-after-switch": (dict(deferred_steps=2, reservoir_size=40, dead_code_threshold=1.0), 4),
        "gradient": (dict(learning="gradient", gradient="rotation", init="random"), 3),
    }


    def build(options):
        torch.manual_seed(7)
        encoder, decoder = torch.nn.Linear(6, 4), torch.nn.Linear(4, 6)
        vq = Quantizer(4, 10, decay=0.8, deterministic=True, **options)
        opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters(), *vq.parameters()], lr=1e-2)
        return encoder, decoder, vq, opt


    def train(parts, start, stop):
        encoder, decoder, vq, opt = parts
        outs = []
        for i in range(start, stop):
            g = torch.Generator().manual_seed(1000 + i)  # the data does not use the global RNG
            x = torch.randn(48, 6, generator=g)
            mask = torch.rand(48, generator=g) > 0.2
            z = encoder(x)
            q, idx, loss = vq(z, mask=mask)
            total = F.mse_loss(decoder(q), x) + loss
            opt.zero_grad()
            total.backward()
            opt.step()
            outs += [idx, loss.detach(), q.detach()]
        return outs


    def state(parts):
        encoder, decoder, vq, opt = parts
        return {"encoder": encoder.state_dict(), "decoder": decoder.state_dict(), "vq": vq.state_dict(),
                "opt": opt.state_dict(), "rng": torch.get_rng_state()}


    results = {}
    if MODE == "first":
        checkpoints = {}
        for name, (options, save_at) in CONFIGS.items():
            parts = build(options)
            results[name] = {"outs": train(parts, 0, STEPS), "final": state(parts)}
            parts = build(options)
            results[name]["first"] = train(parts, 0, save_at)
            checkpoints[name] = state(parts)
        torch.save(checkpoints, CKPT + ".part")
        os.replace(CKPT + ".part", CKPT)
    else:
        deadline = time.time() + 300
        while not os.path.exists(CKPT):
            if time.time() > deadline:
                sys.exit("no checkpoint after 300 s")
            time.sleep(0.05)
        checkpoints = torch.load(CKPT, weights_only=True)
        for name, (options, save_at) in CONFIGS.items():
            parts = build(options)
            ckpt = checkpoints[name]
            for module, key in zip(parts[:3], ("encoder", "decoder", "vq")):
                module.load_state_dict(ckpt[key], strict=True)
            parts[3].load_state_dict(ckpt["opt"])
            torch.set_rng_state(ckpt["rng"])  # reservoir, random init and dead-code restarts draw from it
            results[name] = {"outs": train(parts, save_at, STEPS), "final": state(parts)}
    torch.save(results, OUT)
    '''
)


def test_resume_in_a_fresh_process_is_bitwise_identical(tmp_path):
    """Checkpoint (state_dicts + the global RNG state) -> a new interpreter -> train on: bitwise the
    uninterrupted run, for EMA + k-means init + dead codes, gradient learning, and Deferred
    Quantization saved mid-continuous-phase (reservoir filling) and after the switch."""
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    ckpt = tmp_path / "checkpoint.pt"

    def start(mode):
        return subprocess.Popen(
            [sys.executable, str(script), mode, str(ckpt), str(tmp_path / f"{mode}.pt")],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

    # Both interpreters start at once (importing torch is most of the time); "resume" waits
    # for the checkpoint, so nothing but the checkpoint carries state from one to the other.
    procs = {mode: start(mode) for mode in ("first", "resume")}
    for mode, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, f"{mode} run failed:\n{out}"
    first = torch.load(tmp_path / "first.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resume.pt", weights_only=True)
    for name in first:
        full = first[name]["outs"]
        joined = first[name]["first"] + resumed[name]["outs"]
        assert len(joined) == len(full)
        for i, (a, b) in enumerate(zip(joined, full)):
            assert bitwise_equal(a, b), f"{name}: step {i // 3}, output {i % 3} differs from the uninterrupted run"
        want, got = first[name]["final"], resumed[name]["final"]
        for part in ("encoder", "decoder", "vq"):
            assert_states_bitwise_equal(got[part], want[part], f"{name}: final {part}")
        assert bitwise_equal(got["rng"], want["rng"]), f"{name}: the global RNG stream diverged"
    checkpoints = torch.load(ckpt, weights_only=True)
    mid = checkpoints["deferred-mid-continuous"]["vq"]
    assert not bool(mid["quantizing"]) and int(mid["reservoir_seen"]) > 0, "saved before the switch, reservoir filling"
    assert bool(checkpoints["deferred-after-switch"]["vq"]["quantizing"])
