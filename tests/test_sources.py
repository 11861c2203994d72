"""Copies named by the exporter: Roboflow's <stem>_<ext>.rf.<hash> names, a user's own pattern."""
from __future__ import annotations

from pipeline.data.sources import EXPORTERS, copies_by_name, naming_summary, source_names

H = "0a1b2c3d4e5f60718293a4b5c6d7e8f9"   # Roboflow writes 32 hex digits


def test_roboflow_copies_share_a_source_across_folders_and_extensions():
    names = [f"-2023-11-30-170136_png.rf.{H}.jpg", f"train/-2023-11-30-170136_png.rf.{H[::-1]}.jpg",
             f"valid/images/-2023-11-30-170136_png.rf.{H.upper()}.jpg",
             f"IMG_0042_jpg.rf.{H}.jpg", f"IMG_0042_png.rf.{H}.jpg",       # two uploads: .jpg and .png
             "IMG_0042.jpg", "photo.rf.jpg", f"x.rf.{H[:8]}.jpg"]           # plain, no hash, too short a hash
    src = source_names(names).tolist()
    assert src[:3] == ["roboflow:-2023-11-30-170136_png"] * 3
    assert src[3] == "roboflow:IMG_0042_jpg" != src[4] == "roboflow:IMG_0042_png"
    assert src[5:] == [None, None, None]
    assert copies_by_name(names) == [[0, 1, 2]]


def test_a_pattern_is_tried_first_and_only_its_first_capture_counts():
    names = ["apple/exp_0-01-V1-B.png", "apple/log_0-01-V2-W.png", "apple/exp_0-02-V1-B.png",
             f"IMG_1_jpg.rf.{H}.jpg", f"IMG_1_jpg.rf.{H[::-1]}.jpg"]
    src = source_names(names, r"_(\d-\d\d)-V").tolist()
    assert src[:3] == ["pattern:0-01", "pattern:0-01", "pattern:0-02"]
    assert src[3] == src[4] == "roboflow:IMG_1_jpg"                      # the exporters' namings still apply
    assert copies_by_name(names, r"_(\d-\d\d)-V") == [[0, 1], [3, 4]]
    s = naming_summary(names, r"_(\d-\d\d)-V")
    assert s == {"images_named": 5, "sources": 3, "sources_with_copies": 2, "images_in_named_groups": 4,
                 "max_copies": 2, "namings": {"pattern": 3, "roboflow": 2}}


def test_every_exporter_pattern_has_one_capture():
    import re

    for name, rx in EXPORTERS.items():
        assert re.compile(rx).groups >= 1, name
