"""The offline router: learning to route, checkpoint selection, artifact round trip, config."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from gateway.offline.model import OfflineRouter, RouterConfig
from gateway.offline.train import _losses, holdout_split, routing_accuracy, train_router
from gateway.routing.prior import PriorFit
from reward_router.errors import ConfigError, DataFormatError

RMS = ["math-rm", "chat-rm", "generalist"]
FAST = RouterConfig(hidden_sizes=(32,), dim=8, epochs=120, patience=40, seed=0)


def specialist_problem(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """RM 0 is right where feature 0 > 0, RM 1 where it is < 0, RM 2 is mediocre everywhere."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 16)).astype(np.float32)
    p = np.stack(
        [
            np.where(x[:, 0] > 0, 0.92, 0.3),
            np.where(x[:, 0] < 0, 0.92, 0.3),
            np.full(n, 0.62),
        ],
        axis=1,
    )
    correct = (rng.random((n, 3)) < p).astype(float)
    groups = [f"prompt-{i // 2}" for i in range(n)]  # two pairs per prompt
    return x, correct, groups


def test_learns_to_route_better_than_best_single() -> None:
    x, c, groups = specialist_problem()
    router, report = train_router(x, c, RMS, FAST, groups=groups)
    assert report.n_valid > 50
    assert report.valid_routing_acc > report.valid_best_single_acc + 0.1
    assert report.beats_best_single
    # And on fresh data from the same problem, not just on the rows that picked the checkpoint.
    x2, c2, _ = specialist_problem(seed=1)
    fresh = routing_accuracy(router.scores(x2), c2)
    assert fresh > c2.mean(axis=0).max() + 0.1


def test_keeps_the_checkpoint_with_best_held_out_routing_accuracy() -> None:
    # Few pairs, a high learning rate and no regularisation: it overfits, so the held-out
    # accuracy peaks early and the last epoch is worse than the best.
    x, c, groups = specialist_problem(120)
    cfg = RouterConfig(
        hidden_sizes=(64,),
        dim=8,
        epochs=80,
        patience=0,
        lr=1e-2,
        dropout=0.0,
        input_dropout=0.0,
        weight_decay=0.0,
        select_margin=0.0,
    )
    router, report = train_router(x, c, RMS, cfg, groups=groups)
    accs = [log.valid_routing_acc for log in report.history]
    assert len(report.history) == 81 and report.history[0].epoch == 0
    assert accs[-1] < max(accs) and report.best_epoch < 80
    assert report.valid_routing_acc == pytest.approx(max(accs))
    assert report.history[report.best_epoch].valid_routing_acc == pytest.approx(max(accs))
    _, va = holdout_split(len(x), groups, 0.2, cfg.seed)
    assert routing_accuracy(router.scores(x[va]), c[va]) == pytest.approx(max(accs))


def test_early_stopping_ends_training_after_patience_epochs() -> None:
    x, c, groups = specialist_problem(120)
    cfg = RouterConfig(hidden_sizes=(64,), dim=8, epochs=300, patience=10, lr=1e-2, dropout=0.0)
    _, report = train_router(x, c, RMS, cfg, groups=groups)
    assert report.stopped_early
    assert report.epochs_run == report.best_epoch + 10 < 300


def test_untrained_router_is_the_training_best_rm_so_no_learnable_signal_does_no_harm() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    c = (rng.random((300, 3)) < [0.55, 0.75, 0.6]).astype(float)  # features carry nothing
    loose = RouterConfig(hidden_sizes=(32,), dim=8, epochs=120, patience=40, select_margin=0.0)
    _, report = train_router(x, c, RMS, loose)
    assert report.train_best_rm == "chat-rm"
    assert report.history[0].valid_routing_acc == pytest.approx(report.valid_train_best_acc)
    assert report.valid_routing_acc >= report.valid_train_best_acc


def test_selection_margin_keeps_the_best_single_rm_unless_routing_clearly_wins() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    c = (rng.random((300, 3)) < [0.55, 0.75, 0.6]).astype(float)  # features carry nothing
    strict = RouterConfig(hidden_sizes=(32,), dim=8, epochs=120, patience=40, select_margin=3.0)
    router, report = train_router(x, c, RMS, strict)
    # Some epoch did beat epoch 0 by luck, but not by 3 standard errors: nothing is kept.
    accs = [log.valid_routing_acc for log in report.history]
    assert max(accs) > accs[0]
    assert report.best_epoch == 0
    assert set(router.route(x)) == {RMS.index("chat-rm")}
    np.testing.assert_array_equal(router.prior_means[:, :-1], 0.0)
    # A real signal passes the same bar.
    xs, cs, groups = specialist_problem()
    _, report = train_router(xs, cs, RMS, strict, groups=groups)
    assert report.best_epoch > 0 and report.beats_best_single


def test_group_split_keeps_prompts_on_one_side() -> None:
    groups = [f"g{i % 37}" for i in range(200)]
    tr, va = holdout_split(200, groups, 0.25, seed=1)
    assert set(tr).isdisjoint(va) and len(tr) + len(va) == 200
    assert {groups[i] for i in tr}.isdisjoint({groups[i] for i in va})
    assert 0.15 < len(va) / 200 < 0.35
    with pytest.raises(ConfigError) as err:
        holdout_split(4, ["same"] * 4, 0.2, seed=0)
    assert err.value.field == "groups"


def test_deterministic_given_the_seed() -> None:
    x, c, groups = specialist_problem(200)
    r1, _ = train_router(x, c, RMS, FAST, groups=groups)
    r2, _ = train_router(x, c, RMS, FAST, groups=groups)
    np.testing.assert_array_equal(r1.scores(x), r2.scores(x))
    other = RouterConfig(hidden_sizes=(32,), dim=8, epochs=120, patience=40, seed=1)
    r3, _ = train_router(x, c, RMS, other, groups=groups)
    assert not np.array_equal(r1.scores(x), r3.scores(x))


def test_context_and_prior_means_reproduce_the_scores() -> None:
    x, c, groups = specialist_problem(200)
    router, _ = train_router(x, c, RMS, FAST, groups=groups)
    h = router.hidden(x)
    assert h.shape == (200, FAST.dim + 1) == (200, router.dim)
    np.testing.assert_array_equal(h[:, -1], 1.0)
    np.testing.assert_allclose(np.linalg.norm(h[:, :-1], axis=1), 1.0, rtol=1e-6)
    assert router.prior_means.shape == (3, router.dim)
    np.testing.assert_allclose(router.scores(x), h @ router.bt_means.T)


def test_prior_is_on_the_correctness_scale_with_a_stated_strength() -> None:
    x, c, groups = specialist_problem()
    router, report = train_router(x, c, RMS, FAST, groups=groups)
    fit = router.prior_fit
    assert fit is not None and report.n_calib > 0
    assert min(fit.slopes) > 0  # the BT head predicts held-out correctness: it is trusted
    h = router.hidden(x)
    expected = h @ router.prior_means.T  # predicted correctness per RM
    # the specialists' regions are found: the prior routes as the BT head does
    agree = (expected.argmax(axis=1) == router.scores(x).argmax(axis=1)).mean()
    assert agree > 0.9
    np.testing.assert_allclose(expected.mean(axis=0), c.mean(axis=0), atol=0.1)
    # strength: the intercept counts the rows the accuracy was measured on (capped)
    prec = router.prior_precision
    assert prec is not None and prec.shape == (3, router.dim)
    np.testing.assert_allclose(prec[:, -1] * np.array(fit.noise), fit.intercept_obs)
    # without held-out rows there is nothing to calibrate on: the raw BT head is the prior
    bare, _ = train_router(x, c, RMS, FAST, valid_fraction=0.0)
    assert bare.prior_fit is None and bare.prior_precision is None
    np.testing.assert_array_equal(bare.prior_means, bare.bt_means)
    with pytest.raises(ValueError, match=r"\(B, 16\)"):
        router.hidden(x[:, :8])


def test_save_load_round_trip_is_exact_and_pickle_free(tmp_path: Path) -> None:
    x, c, groups = specialist_problem(200)
    router, report = train_router(x, c, RMS, FAST, groups=groups, encoder_ref="/enc", max_length=64)
    router.save(tmp_path / "art")
    files = sorted(p.name for p in (tmp_path / "art").iterdir())
    assert files == ["config.json", "model.safetensors"]
    raw = (tmp_path / "art" / "model.safetensors").read_bytes()
    # safetensors: 8-byte little-endian header length, then a JSON header; never a pickle
    # (b"\x80") or a torch zip (b"PK").
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert "bt.embeddings" in header and not raw.startswith((b"\x80", b"PK"))
    cfg = json.loads((tmp_path / "art" / "config.json").read_text())
    assert cfg["rms"] == RMS and cfg["encoder_ref"] == "/enc" and cfg["max_length"] == 64
    assert cfg["info"]["train"]["valid_routing_acc"] == pytest.approx(report.valid_routing_acc)

    loaded = OfflineRouter.load(tmp_path / "art")
    assert loaded.rms == RMS and loaded.config == FAST and loaded.input_dim == 16
    np.testing.assert_array_equal(loaded.hidden(x), router.hidden(x))
    np.testing.assert_array_equal(loaded.prior_means, router.prior_means)
    np.testing.assert_array_equal(loaded.scores(x), router.scores(x))
    assert loaded.prior_fit == router.prior_fit is not None


def test_a_domain_head_puts_each_rms_domain_accuracy_in_the_prior(tmp_path: Path) -> None:
    # The specialists' regions are the two domains: the head learns them from the features,
    # and the prior alone (BT slopes off, as if the BT head had learned nothing) routes each
    # domain to its specialist.
    x, c, groups = specialist_problem(400)
    domains = ["pos" if v > 0 else "neg" for v in x[:, 0]]
    router, _ = train_router(x, c, RMS, FAST, groups=groups, domains=domains)
    assert router.domains == ["neg", "pos"]
    assert router.dim == FAST.dim + 2 + 1
    h = router.hidden(x)
    q = h[:, FAST.dim : FAST.dim + 2]
    np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-6)
    assert (q.argmax(axis=1) == (x[:, 0] > 0)).mean() > 0.95
    np.testing.assert_allclose(router.scores(x), h @ router.bt_means.T, rtol=1e-5, atol=1e-6)
    fit = router.prior_fit
    assert fit is not None and fit.domain_effects is not None
    effects = np.asarray(fit.domain_effects)  # (RM, domain): math-rm is right where x0 > 0
    assert effects[0, 1] > 0.2 > -0.2 > effects[0, 0]
    assert effects[1, 0] > 0.2 > -0.2 > effects[1, 1]
    flat = PriorFit(**{**fit.__dict__, "slopes": (0.0,) * 3})
    picks = (h @ flat.apply(router.bt_means).T).argmax(axis=1)
    assert (picks == np.where(x[:, 0] > 0, 0, 1)).mean() > 0.9
    prec = router.prior_precision
    assert prec is not None
    np.testing.assert_allclose(prec[:, -3:-1] * np.asarray(fit.noise)[:, None], fit.domain_obs)
    router.save(tmp_path / "art")
    loaded = OfflineRouter.load(tmp_path / "art")
    assert loaded.domains == router.domains and loaded.prior_fit == fit
    np.testing.assert_array_equal(loaded.hidden(x), h)
    np.testing.assert_array_equal(loaded.prior_means, router.prior_means)


def test_no_domain_head_from_one_domain_or_when_turned_off() -> None:
    x, c, groups = specialist_problem(200)
    one, _ = train_router(x, c, RMS, FAST, groups=groups, domains=["chat"] * 200)
    two = ["a" if v > 0 else "b" for v in x[:, 0]]
    off, _ = train_router(
        x, c, RMS, RouterConfig(**{**FAST.to_dict(), "domain_head": False}), domains=two
    )
    for router in (one, off):
        assert router.domains == [] and router.dim == FAST.dim + 1
        assert router.prior_fit is None or router.prior_fit.domain_effects is None
    with pytest.raises(ConfigError) as info:
        train_router(x, c, RMS, FAST, domains=two[:10])
    assert info.value.field == "domains"


def test_damaged_artifacts_raise_data_format_errors(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"config\.json.*not found"):
        OfflineRouter.load(tmp_path)
    x, c, _ = specialist_problem(60)
    router, _ = train_router(x, c, RMS, RouterConfig(hidden_sizes=(8,), dim=4, epochs=2))
    router.save(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(DataFormatError, match="safetensors"):
        OfflineRouter.load(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "version": 99}))
    with pytest.raises(DataFormatError) as err:
        OfflineRouter.load(tmp_path)
    assert err.value.field == "version"


def test_ties_count_for_neither_side_of_the_bradley_terry_loss() -> None:
    scores = torch.tensor([[2.0, 0.5, -1.0]])
    logits = torch.zeros(1, 3)
    target = torch.tensor([[1.0, 0.5, 0.0]])
    _, bt, cls = _losses(scores, logits, target, lambda_cls=1.0)
    # Only (RM 0 right, RM 2 wrong); the tied RM 1 is in no comparison.
    assert bt.item() == pytest.approx(float(np.log1p(np.exp(-3.0))), rel=1e-6)
    assert cls.item() == pytest.approx(float(np.log(2.0)), rel=1e-6)
    _, bt_all_agree, _ = _losses(scores, logits, torch.ones(1, 3), 1.0)
    assert bt_all_agree.item() == 0.0


def test_no_held_out_split_trains_every_epoch() -> None:
    x, c, _ = specialist_problem(80)
    cfg = RouterConfig(hidden_sizes=(8,), dim=4, epochs=5)
    _, report = train_router(x, c, RMS, cfg, valid_fraction=0.0)
    assert report.n_valid == 0 and report.best_epoch == 5 and report.epochs_run == 5
    assert np.isnan(report.valid_routing_acc) and report.summary()["valid_routing_acc"] is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("dim", 0),
        ("hidden_sizes", (16, 0)),
        ("dropout", 1.0),
        ("input_dropout", -0.1),
        ("lambda_cls", -1.0),
        ("weight_decay", float("nan")),
        ("lr", 0.0),
        ("epochs", 0),
        ("patience", -1),
        ("batch_size", True),
        ("seed", -3),
        ("num_threads", 0),
        ("select_margin", -1.0),
    ],
)
def test_bad_config_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        RouterConfig(**{field: value})  # type: ignore[arg-type]
    assert err.value.field == field
    assert field in str(err.value)


def test_config_from_dict_round_trips_and_rejects_unknown_keys() -> None:
    cfg = RouterConfig(hidden_sizes=(64, 32), dim=16)
    assert RouterConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError) as err:
        RouterConfig.from_dict({"hiden_sizes": [3]})
    assert err.value.field == "hiden_sizes"


def test_bad_training_inputs_name_the_field() -> None:
    x, c, groups = specialist_problem(40)
    bad = c.copy()
    bad[3, 1] = 0.7
    cases = [
        ((x, bad, RMS), {}, "correct"),
        ((x, c, RMS[:2]), {}, "rms"),
        ((x, c, RMS), {"groups": groups[:5]}, "groups"),
        ((x, c, RMS), {"valid_fraction": 0.95}, "valid_fraction"),
        ((np.full_like(x, np.nan), c, RMS), {}, "features"),
    ]
    for args, kwargs, field in cases:
        with pytest.raises(ConfigError) as err:
            train_router(*args, FAST, **kwargs)  # type: ignore[arg-type]
        assert err.value.field == field
