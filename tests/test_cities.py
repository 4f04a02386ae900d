"""Every city of the data is served by its own name, pooled ones included, and no two cities
share a house for one seed; unknown names are a 404 unless a fallback is asked for."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from toy_run import make_toy_workspace

from neighbourhoods.core.cities import ANY_CITY, CityMap, UnknownCity
from neighbourhoods.generate import GenerateConfig, generate
from neighbourhoods.models import runs
from neighbourhoods.serve import ServeConfig, build, create_app
from neighbourhoods.thumbnails.source import load_source

TINY_DCGAN = {"ngf": 8, "ndf": 8, "z_dim": 16, "g_embed": 4, "d_embed": 2}


# --- the mapping ---------------------------------------------------------------------------------
def test_a_pooled_city_is_drawn_from_the_shared_class_by_its_own_name():
    m = CityMap.build(["Big", "Mid", ANY_CITY], ["Big", "Mid", "Small", "Frazier Park, CA"])
    match = m.resolve("  frazier PARK, ca ")
    assert match.city == "Frazier Park, CA" and match.draws_from == ANY_CITY and not match.fallback
    assert match.class_index == 2
    assert m.resolve("Big").own_class and m.resolve("Big").class_index == 0
    assert m.cities == ["Big", "Mid", ANY_CITY, "Frazier Park, CA", "Small"]


def test_cities_sharing_a_class_get_different_seeds_and_own_classes_keep_theirs():
    m = CityMap.build(["Big", ANY_CITY], ["Big", "Small", "Tiny"])
    assert m.resolve("Big").seed(7) == 7
    small = [m.resolve("Small").seed(s) for s in range(100)]
    tiny = [m.resolve("Tiny").seed(s) for s in range(100)]
    assert len(set(small)) == 100 and not set(small) & set(tiny)
    assert small == [m.resolve("small").seed(s) for s in range(100)]   # deterministic, spelling-folded


def test_a_name_the_data_never_had_is_unknown_unless_a_fallback_is_asked_for():
    m = CityMap.build(["Sunvale", ANY_CITY], ["Sunvale", "Tinyville"])
    with pytest.raises(UnknownCity) as e:
        m.resolve("Tinyvile")
    assert e.value.matches[0] == "Tinyville"
    match = m.resolve("Atlantis", fallback="any")
    assert match.fallback and match.draws_from == ANY_CITY and match.city == "Atlantis"
    with pytest.raises(UnknownCity):
        CityMap.build(["Sunvale"]).resolve("Atlantis", fallback="any")   # no shared class to fall back to


def test_runs_written_before_the_city_map_get_it_from_their_merged_cities():
    m = runs.city_map_of({"merged_cities": ["Tinyville"]}, ["Sunvale", ANY_CITY])
    assert m.resolve("Tinyville").draws_from == ANY_CITY


def test_evaluate_draws_each_held_out_city_from_the_class_the_map_names():
    m = CityMap.build(["A", ANY_CITY], ["A", "small"])
    assert m.class_lut(["A", "small", "gone"]).tolist() == [0, 1, 1, 1]


# --- a run with a pooled city, end to end ---------------------------------------------------------
@pytest.fixture(scope="module")
def pooled_run(tmp_path_factory):
    """Toy town (3 cities x 12 photos) plus 'Tinyville' (3 photos, pooled into (any city))."""
    from neighbourhoods.train import TrainConfig, train

    ws = make_toy_workspace(tmp_path_factory.mktemp("cities"), res=((32, 32),))
    config = TrainConfig(model="dcgan", res=(32, 32), batch=8, kimg=0.016, min_city_photos=5, run="pooled",
                         model_kwargs=TINY_DCGAN, snapshot_every=8, sample_every=10_000, tick_every=8,
                         num_workers=0, progress=False)
    train(ws, config)
    return ws, "pooled", config


def test_the_run_records_every_city_of_the_data(pooled_run):
    ws, run, _ = pooled_run
    config = json.loads((Path(ws) / "runs" / run / "config.json").read_text())
    assert config["city_map"] == {"Harborview": "Harborview", "Pinecrest": "Pinecrest", "Sunvale": "Sunvale",
                                  ANY_CITY: ANY_CITY, "Tinyville": ANY_CITY}


def test_generate_writes_every_city_by_its_own_name(pooled_run, tmp_path):
    ws, run, _ = pooled_run
    manifest = generate(ws, run, tmp_path, GenerateConfig(n=2, size=(64, 48), every_city=True, novelty=False),
                        progress=False)
    assert set(manifest["cities"]) == {"Harborview", "Pinecrest", "Sunvale", ANY_CITY, "Tinyville"}
    tiny = manifest["cities"]["Tinyville"]
    assert tiny["draws_from"] == ANY_CITY and [f["seed"] for f in tiny["files"]] == [0, 1]
    # Tinyville and (any city) share a class, but not a house: Tinyville samples seeds of its own
    assert (tmp_path / tiny["files"][0]["file"]).read_bytes() != \
        (tmp_path / manifest["cities"][ANY_CITY]["files"][0]["file"]).read_bytes()


def test_generate_names_close_matches_or_falls_back_when_asked(pooled_run, tmp_path):
    ws, run, _ = pooled_run
    with pytest.raises(UnknownCity, match="close matches: Tinyville"):
        generate(ws, run, tmp_path, GenerateConfig(n=1, cities=["Tinyvile"], novelty=False), progress=False)
    manifest = generate(ws, run, tmp_path, GenerateConfig(n=1, cities=["Atlantis"], fallback="any", novelty=False),
                        progress=False)
    assert manifest["cities"]["Atlantis"]["fallback"] is True


@pytest.fixture(scope="module")
def client(pooled_run):
    ws, run, _ = pooled_run
    with TestClient(create_app(build(ws, run, ServeConfig(max_wait_ms=1), novelty=False))) as c:
        yield c


def test_serve_lists_every_city_and_what_it_draws_from(client):
    cities = {c["name"]: c for c in client.get("/cities").json()["cities"]}
    assert set(cities) == {"Harborview", "Pinecrest", "Sunvale", ANY_CITY, "Tinyville"}
    assert cities["Tinyville"]["draws_from"] == ANY_CITY and not cities["Tinyville"]["own_class"]
    assert cities["Sunvale"]["own_class"]


def test_serve_answers_a_pooled_city_by_name_and_says_where_it_is_drawn_from(client):
    r = client.get("/thumbnail", params={"city": "tinyville", "seed": 3})
    assert r.status_code == 200 and r.headers["x-city-drawn-from"] == "%28any%20city%29"
    assert "x-city-fallback" not in r.headers
    other = client.get("/thumbnail", params={"city": ANY_CITY, "seed": 3})
    assert other.headers["etag"] != r.headers["etag"]


def test_serve_404s_an_unknown_city_with_close_matches_unless_a_fallback_is_asked_for(client):
    r = client.get("/thumbnail", params={"city": "Tinyvile", "seed": 1})
    assert r.status_code == 404 and r.json()["close_matches"][0] == "Tinyville"
    r = client.get("/thumbnail", params={"city": "Atlantis", "seed": 1, "fallback": "any"})
    assert r.status_code == 200 and r.headers["x-city-fallback"] == "any"
    assert client.get("/thumbnail", params={"city": "Atlantis", "seed": 1, "fallback": "nearest"}).status_code == 422


def test_the_mapping_survives_a_resume_and_an_export(pooled_run, tmp_path):
    from dataclasses import replace

    from neighbourhoods.export import export
    from neighbourhoods.train import train

    ws, run, config = pooled_run
    before = runs.load_generator(Path(ws) / "runs" / run).city_map
    train(ws, replace(config, kimg=0.024, resume=True))
    after = runs.load_generator(Path(ws) / "runs" / run).city_map
    assert after == before and after.resolve("Tinyville").draws_from == ANY_CITY
    export(ws, run, tmp_path / "g.pt2")
    exported = load_source(ws, str(tmp_path / "g.pt2"))
    assert exported.city_map == after
    match = exported.resolve("Tinyville")
    run_image = load_source(ws, run).sample([match.class_index], [match.seed(5)])
    assert np.abs(exported.sample([match.class_index], [match.seed(5)]).astype(int) - run_image).max() <= 1
