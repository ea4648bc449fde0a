"""Time-series data: the periodic toy, synthetic pen trajectories, the PhysioNet loader on files written here."""

import math
import os

import pytest
import torch

from pylux.data import PHYSIONET_PARAMETERS, character_trajectories, periodic_series, physionet


def test_periodic_series_is_seeded_and_shaped():
    a, b = periodic_series(8, n_times=40, seed=3), periodic_series(8, n_times=40, seed=3)
    c = periodic_series(8, n_times=40, seed=4)
    assert torch.equal(a["values"], b["values"]) and not torch.equal(a["values"], c["values"])
    assert a["times"].shape == (40,) and a["values"].shape == (8, 40, 1) and a["mask"].shape == (8, 40, 1)
    assert float(a["times"][0]) == 0.0 and bool((a["times"].diff() > 0).all()) and float(a["times"][-1]) <= 5.0
    assert int(a["mask"].sum()) == 8 * 20                      # half of each series observed
    # the values are the stated sinusoids plus noise of the stated size
    t = a["times"].double()
    clean = torch.sin(2 * math.pi * a["frequency"].double() * t + a["phase"].double())
    residual = a["values"][..., 0].double() - clean
    assert 0.007 < float(residual.std()) < 0.013
    with pytest.raises(ValueError, match="frequency"):
        periodic_series(2, frequency=(0.5, 0.1))


def test_character_trajectories_classes_sampling_and_drops():
    data = character_trajectories(64, length=30, drop=0.3, seed=1)
    times, values, labels = data["times"], data["values"], data["labels"]
    assert times.shape == (64, 30) and values.shape == (64, 30, 2) and labels.shape == (64,)
    assert bool((times.diff(dim=1) > 0).all()) and bool((times[:, 0] == 0).all()) and bool((times[:, -1] == 1).all())
    assert not torch.equal(times[0], times[1])                # each sample has its own times
    missing = torch.isnan(values[..., 0])
    assert int(missing.sum()) == 64 * round(0.3 * 28)
    assert not missing[:, 0].any() and not missing[:, -1].any()
    assert set(labels.tolist()) == {0, 1, 2, 3}
    # the classes differ in shape: their mean end points lie apart by more than the spread of offsets
    ends = torch.stack([values[labels == k, -1].mean(0) for k in range(4)])
    assert float(torch.cdist(ends, ends).max()) > 0.5
    again = character_trajectories(64, length=30, drop=0.3, seed=1)
    assert torch.equal(torch.nan_to_num(again["values"]), torch.nan_to_num(values))


def _write_record(folder, record_id, lines):
    with open(os.path.join(folder, f"{record_id}.txt"), "w") as fh:
        fh.write("Time,Parameter,Value\n")
        fh.write(f"00:00,RecordID,{record_id}\n")
        fh.write("\n".join(lines) + "\n")


def test_physionet_loader_rounds_averages_normalises(tmp_path):
    folder = tmp_path / "set-a"
    folder.mkdir()
    _write_record(folder, "132539", ["00:00,Age,54", "00:00,Gender,0", "00:07,HR,73", "00:09,HR,77",
                                     "00:37,Temp,35.1", "01:02,HR,80", "01:02,Weight,-1"])
    _write_record(folder, "132540", ["00:00,Age,76", "00:31,HR,88", "02:00,Temp,37.5"])
    (tmp_path / "Outcomes-a.txt").write_text("RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death\n"
                                             "132539,6,1,5,-1,0\n132540,16,8,8,-1,1\n")
    data = physionet(str(folder))
    assert data["record_ids"] == ["132539", "132540"]
    hr, temp, age = (PHYSIONET_PARAMETERS.index(k) for k in ("HR", "Temp", "Age"))
    # record 1: times 0, 0.1 (00:07 and 00:09 round to 0.1 h: HR averaged to 75), 0.6 (00:37), 1.0 (01:02)
    assert torch.allclose(data["times"][0, :4].double(), torch.tensor([0.0, 0.1, 0.6, 1.0], dtype=torch.float64))
    assert int(data["lengths"][0]) == 4 and int(data["lengths"][1]) == 3
    # the shorter record is padded by repeating its last time (a zero step)
    assert float(data["times"][1, 3]) == float(data["times"][1, 2]) == 2.0
    # HR over the directory: 75, 80, 88 -> min 75, max 88
    assert abs(float(data["values"][0, 1, hr]) - 0.0) < 1e-6
    assert abs(float(data["values"][0, 3, hr]) - (80 - 75) / 13) < 1e-6
    assert abs(float(data["values"][1, 1, hr]) - 1.0) < 1e-6
    assert abs(float(data["values"][1, 0, age]) - 1.0) < 1e-6 and float(data["values"][0, 0, age]) == 0.0
    assert bool(data["mask"][0, 2, temp]) and not bool(data["mask"][0, 1, temp])
    assert float(data["values"][0, 1, temp]) == 0.0            # missing entries are 0
    assert data["labels"].tolist() == [0.0, 1.0]
    assert data["values"].shape == (2, 4, 41)


def test_physionet_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        physionet(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no record files"):
        physionet(str(tmp_path))
    (tmp_path / "1.txt").write_text("Time,Parameter,Value\n00:00,RecordID,1\n0x:00,HR,7\n")
    with pytest.raises(ValueError, match="line 3"):
        physionet(str(tmp_path))
    (tmp_path / "1.txt").write_text("Time,Parameter,Value\n00:00,Bogus,1\n")
    with pytest.raises(ValueError, match="unknown parameter 'Bogus'"):
        physionet(str(tmp_path))
