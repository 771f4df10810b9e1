"""bench/r20_budget_probe.py's variant names: each part changes one field of the cpu_resnet20 profile."""

import pytest

from bench.r20_budget_probe import parse_variant
from bench.repair_bench import PROFILES


def test_variant_parts_change_only_their_fields() -> None:
    base = PROFILES["cpu_resnet20"]
    prof = parse_variant("n2500_e20_aug1_lr0.02_b64", base)
    assert (prof.n_train, prof.epochs, prof.augment, prof.lr, prof.batch_size) == (2500, 20, True, 0.02, 64)
    assert (prof.n_defender, prof.n_test, prof.attacks) == (base.n_defender, base.n_test, base.attacks)
    assert parse_variant("lr0.05", base).epochs == base.epochs


def test_unknown_variant_part_is_refused() -> None:
    with pytest.raises(SystemExit):
        parse_variant("wd5e-4", PROFILES["cpu_resnet20"])
