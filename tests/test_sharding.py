"""FSDP sharding asserted on real arrays, not inferred from the rule table.

The SigLIP smoke trainer is built with `prepare` on a simulated 4 (data) x 2 (fsdp) mesh of 8 CPU devices, its
state is initialised and stepped once on a sharded batch, and then every parameter leaf and every optimizer-state
leaf is checked twice: its `.sharding` against the spec `spec_for` gives its rule name (a parameter's path in the
params tree; an Adam moment takes its parameter's name, other state its own path), and, independently of any spec,
the shapes and index ranges of its addressable shards (a leaf split over `fsdp` has shards half its size along
one axis, in two distinct halves; a replicated leaf has full-size shards). Adam's moments must be placed exactly
like the parameter they belong to, or every update would move data between devices. The same run with the rule
table `[(".*", "replicate")]` must split nothing, so the checks can tell the two apart.

The device count must be set before JAX starts and this process's JAX already has one device, so the trainer runs
in a subprocess (as in test_losses.py and test_siglip_train.py) that reports every leaf as JSON.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

_REPORT_LEAVES = textwrap.dedent("""
    import json, sys
    import jax
    from jax.sharding import NamedSharding
    from big_vision_lite.train.config import apply_overrides, load_config
    from big_vision_lite.train.loop import prepare
    from big_vision_lite.train.sharding import shard_batch, spec_for
    from big_vision_lite.utils.trees import path_name

    MOMENTS = ("mu", "nu")
    # `kernels` anchors its first rule at a parameter name (`img/...`), which a rule matched against state paths
    # (`params/img/...`, `opt_state/.../mu/img/...`) would silently miss.
    RULES = {"replicate": "[('.*', 'replicate')]", "kernels": "[('^(img|txt)/.*kernel$', 'fsdp'), ('.*', 'replicate')]"}

    def describe(tree, prefix, rules, mesh):
        rows = []
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            name = path_name(path)
            # The parameter an Adam moment mirrors: the part of its path after the `mu` / `nu` field.
            names = [getattr(k, "name", None) for k in path]
            moment = next((m for m in MOMENTS if m in names), None)
            param = path_name(path[names.index(moment) + 1:]) if moment else None
            expected = spec_for(name if prefix == "params" else (param or f"{prefix}/{name}"), leaf.shape, rules, mesh)
            rows.append(dict(
                name=name, moment=moment, param=param, shape=list(leaf.shape), spec=str(leaf.sharding.spec),
                expected=str(expected),
                matches=leaf.sharding.is_equivalent_to(NamedSharding(mesh, expected), leaf.ndim),
                shard_shapes=sorted({tuple(s.data.shape) for s in leaf.addressable_shards}),
                shard_indices=len({str(s.index) for s in leaf.addressable_shards}),
                devices=len(leaf.addressable_shards)))
        return rows

    out = {}
    for variant in sys.argv[2:]:
        sets = ["mesh.data=4", "mesh.fsdp=2"]
        sets += [f"sharding_rules={RULES[variant]}"] if variant in RULES else []
        config = apply_overrides(load_config("siglip_shapes:smoke"), sets)
        trainer = prepare(config, f"{sys.argv[1]}/{variant}")
        rules = [tuple(r) for r in config.sharding_rules]
        state = trainer.init_state()
        init_params = describe(state["params"], "params", rules, trainer.mesh)
        batch = shard_batch(next(trainer.task.batches(0)), trainer.mesh)
        state, metrics = trainer.step(state, batch)
        out[variant] = dict(
            devices=len(jax.devices()), mesh=dict(trainer.mesh.shape), step=int(state["step"]),
            loss=float(metrics["loss"]), init_params=init_params,
            params=describe(state["params"], "params", rules, trainer.mesh),
            opt_state=describe(state["opt_state"], "opt_state", rules, trainer.mesh))
    print("REPORT" + json.dumps(out))
""")


VARIANTS = ("fsdp", "kernels", "replicate")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """Leaf reports of the default rules (`fsdp`: everything), of `kernels` (kernels fsdp, the rest replicated) and
    of `replicate`, from one 8-device subprocess."""
    tmp = tmp_path_factory.mktemp("sharding")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _REPORT_LEAVES, str(tmp), *VARIANTS], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT"))
    return json.loads(line.removeprefix("REPORT"))


def _is_split(row: dict) -> bool:
    """Shards half the leaf's size along exactly one axis, in two distinct halves (the fsdp axis has size 2)."""
    if len(row["shard_shapes"]) != 1:
        return False
    halved = [i for i, (s, full) in enumerate(zip(row["shard_shapes"][0], row["shape"], strict=True)) if s != full]
    return (len(halved) == 1 and row["shard_shapes"][0][halved[0]] * 2 == row["shape"][halved[0]]
            and row["shard_indices"] == 2)


def _is_replicated(row: dict) -> bool:
    return row["shard_shapes"] == [row["shape"]]  # one shard shape (JSON lists), the leaf's own


def test_run_is_on_eight_devices_and_steps(report):
    """The trainer really ran on the 4 x 2 mesh, and the sharded step produced a finite loss."""
    for variant in VARIANTS:
        r = report[variant]
        assert r["devices"] == 8 and r["mesh"] == {"data": 4, "fsdp": 2}, variant
        assert r["step"] == 1 and math.isfinite(r["loss"]), variant
        for row in r["params"] + r["opt_state"]:
            assert row["devices"] == 8, row["name"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tree", ["init_params", "params", "opt_state"])
def test_every_leaf_has_the_spec_its_rule_gives(report, variant, tree):
    """Every parameter and optimizer-state leaf (after init and after a step) is placed as `spec_for` says for its
    path, and its shards have the shapes that spec implies."""
    rows = report[variant][tree]
    assert rows, f"{tree} has no leaves"
    wrong = [f"{r['name']}: {r['spec']} != {r['expected']}" for r in rows if not r["matches"]]
    assert not wrong, "\n".join(wrong)
    for row in rows:
        split = "fsdp" in row["expected"]
        assert (_is_split(row) if split else _is_replicated(row)), row


@pytest.mark.parametrize("variant", ["fsdp", "kernels"])
def test_adam_moments_mirror_their_parameter(report, variant):
    """Both Adam moments exist for every parameter and have exactly that parameter's shape and placement, also
    when the rule table places kernels and biases differently."""
    params = {r["name"]: r for r in report[variant]["params"]}
    moments = [r for r in report[variant]["opt_state"] if r["moment"]]
    for kind in ("mu", "nu"):
        assert sorted(r["param"] for r in moments if r["moment"] == kind) == sorted(params), kind
    for m in moments:
        p = params[m["param"]]
        assert (m["shape"], m["spec"], m["shard_shapes"]) == (p["shape"], p["spec"], p["shard_shapes"]), m["name"]
    assert any(_is_split(m) for m in moments)  # the moments are sharded too, not merely "equal" when replicated


def test_fsdp_splits_the_large_kernels_and_replicates_scalars(report):
    """Under the default `(".*", "fsdp")` rule the largest kernel (and every kernel with an even axis) is split
    over the fsdp axis, while SigLIP's scalars `t` and `b` stay whole on every device."""
    params = {r["name"]: r for r in report["fsdp"]["params"]}
    largest = max(params.values(), key=lambda r: (len(r["shape"]) >= 2, math.prod(r["shape"])))
    assert len(largest["shape"]) >= 2 and _is_split(largest), largest
    kernels = [r for r in params.values() if r["name"].endswith("kernel")]
    assert kernels and all(_is_split(r) for r in kernels if any(d % 2 == 0 for d in r["shape"])), kernels
    for scalar in ("t", "b"):
        assert params[scalar]["shape"] in ([], [1]) and _is_replicated(params[scalar]), params[scalar]


def test_kernel_rule_splits_kernels_and_replicates_the_rest(report):
    """With `[("^(img|txt)/.*kernel$", "fsdp"), (".*", "replicate")]` (first match wins) the kernels are split and
    the small leaves (biases, norm scales, `t`, `b`) are whole on every device, in the parameters and in Adam's
    moments."""
    rows = report["kernels"]["params"] + [r for r in report["kernels"]["opt_state"] if r["moment"]]
    kernels = [r for r in rows if r["name"].endswith("kernel")]
    others = [r for r in rows if not r["name"].endswith("kernel")]
    assert kernels and any(_is_split(r) for r in kernels)
    assert any(r["name"].endswith("bias") for r in others) and all(_is_replicated(r) for r in others), others


def test_replicate_rule_splits_nothing(report):
    """The control: with `[(".*", "replicate")]` no parameter or optimizer leaf is split, so the split kernels
    above come from the fsdp rule, not from how the mesh or the step places arrays anyway."""
    rows = report["replicate"]["params"] + report["replicate"]["opt_state"]
    assert all(_is_replicated(r) and "fsdp" not in r["spec"] for r in rows), [r for r in rows if not _is_replicated(r)]

