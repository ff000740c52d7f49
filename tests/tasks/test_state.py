"""A build's state travels as plain values, and comes back as it left."""

from __future__ import annotations

import dataclasses
import json

from config.references import ImageRef
from tasks.state import BuildState


def _full_state() -> BuildState:
    """A state with every kind of field set: nested mappings, lists, a reference."""
    return BuildState(
        request_id="r-1", source={"kind": "git", "location": "https://example.com/x.git",
                                  "ref": "main"},
        ref=ImageRef("registry.example.com", "team/app", "abc123", None),
        build_args={"A": "1"}, secrets=["TOKEN"], platforms=["linux/amd64", "linux/arm64"],
        entrypoint=["python", "-m", "app"],
        generated={"dependencies": "locked", "ignore": [".git", "*.pyc"], "job": {"k": [1, 2]}},
        config={"builder": {"type": "docker", "destination": "registry.example.com/team/app"},
                "registry": {"type": "v2", "options": [{"a": None}]}},
        bases=[{"ref": "python:3.11", "digest": "sha256:" + "0" * 64}],
        stages={"fetch": 0.001, "hash": 0.004}, status="skipped", cancelled_at=1.5)


def test_to_dict_is_what_asdict_made() -> None:
    state = _full_state()
    assert state.to_dict() == dataclasses.asdict(state)
    assert json.loads(json.dumps(state.to_dict())) == dataclasses.asdict(state)


def test_to_dict_copies_every_container() -> None:
    state = _full_state()
    data = state.to_dict()
    data["config"]["builder"]["type"] = "kaniko"
    data["generated"]["job"]["k"].append(3)
    data["bases"][0]["digest"] = "changed"
    data["stages"]["hash"] = 9.0
    data["platforms"].append("linux/s390x")
    assert state.config["builder"]["type"] == "docker"
    assert state.generated == {"dependencies": "locked", "ignore": [".git", "*.pyc"],
                               "job": {"k": [1, 2]}}
    assert state.bases[0]["digest"].startswith("sha256:")
    assert state.stages["hash"] == 0.004
    assert state.platforms == ["linux/amd64", "linux/arm64"]


def test_a_state_comes_back_from_its_dict() -> None:
    state = _full_state()
    assert BuildState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    bare = BuildState(request_id="r-2", source={"kind": "directory", "location": "/src"})
    assert BuildState.from_dict(bare.to_dict()) == bare
