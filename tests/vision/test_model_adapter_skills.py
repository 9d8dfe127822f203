"""DigitCNN, the module adapter and the domain-accuracy skill."""

from __future__ import annotations

import pytest
import torch

from cycleqd.skills.base import Skill
from cycleqd.vision.adapter import ModuleAdapter
from cycleqd.vision.data import build_domains
from cycleqd.vision.model import DigitCNN, accuracy, predict
from cycleqd.vision.skills import DomainAccuracySkill


@pytest.fixture(scope="module")
def data():
    return build_domains(("clean", "noisy"))


def test_init_is_seeded_by_generator_not_global_rng():
    a = DigitCNN(8, 16, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(123)
    b = DigitCNN(8, 16, generator=torch.Generator().manual_seed(3))
    c = DigitCNN(8, 16, generator=torch.Generator().manual_seed(4))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert not torch.equal(a.fc1.weight, c.fc1.weight)
    assert DigitCNN(8, 16)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="expects"):
        DigitCNN(8, 16)(torch.zeros(2, 8, 8))


def test_adapter_binds_weights_and_checks_them(data):
    donor = DigitCNN(8, 16, generator=torch.Generator().manual_seed(1))
    adapter = ModuleAdapter(lambda: DigitCNN(8, 16))
    model = adapter.bind(donor.state_dict(), "fp1")
    x = data["clean"]["search"].x[:32]
    with torch.inference_mode():
        assert torch.allclose(model(x), donor.eval()(x))
    assert not model.training
    # same fingerprint: no reload; a new one: reload
    other = DigitCNN(8, 16, generator=torch.Generator().manual_seed(2)).state_dict()
    assert adapter.bind(other, "fp1") is model and torch.equal(model.fc2.bias, donor.fc2.bias)
    adapter.bind(other, "fp2")
    assert torch.equal(model.fc2.bias, other["fc2.bias"])
    bad = dict(other)
    bad["fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="fc1.weight"):
        adapter.bind(bad, "fp3")
    missing = {k: v for k, v in other.items() if k != "conv1.bias"}
    with pytest.raises(ValueError, match="conv1.bias"):
        adapter.bind(missing, "fp4")


def test_skill_is_accuracy_with_per_sample_outcomes(data):
    split = data["noisy"]["search"]
    skill = DomainAccuracySkill("noisy", split, batch_size=100)
    assert isinstance(skill, Skill)
    model = DigitCNN(8, 16, generator=torch.Generator().manual_seed(5)).eval()
    res = skill.evaluate(model)
    assert res.quality == pytest.approx(accuracy(model, split.x, split.y))
    assert len(res.outcomes) == len(split) and set(res.outcomes.values()) <= {0.0, 1.0}
    pred = predict(model, split.x)
    i = int(split.ids[0])
    assert res.outcomes[f"noisy/search/{i}"] == float(pred[0] == split.y[0])
    assert skill.evaluate(model) == res  # deterministic


def test_skill_never_raises_on_broken_weights(data):
    skill = DomainAccuracySkill("clean", data["clean"]["search"])
    model = DigitCNN(8, 16)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    assert skill.evaluate(model).quality == 0.0

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    res = skill.evaluate(Broken())
    assert res.quality == 0.0 and res.subscores["forward_failed"] == 1.0
