"""HTTP helpers for the server tests (imported as ``server_helpers``: a unique module name,
since test directories are not packages)."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from testkit import HttpApi, assert_error

__all__ = ["Api", "assert_error"]


class Api(HttpApi):
    """Raw HTTP against one server, plus shortcuts for the common setup steps."""

    # -- setup shortcuts ---------------------------------------------------------------------
    def experiment(self, variations: int | list[dict[str, Any]] = 1, name: str = "test") -> str:
        configs = (
            [{"i": i} for i in range(variations)] if isinstance(variations, int) else variations
        )
        eid = f"exp-{secrets.token_hex(6)}"
        self.ok(
            "POST",
            "/v1/experiments",
            201,
            json={"name": name, "variations": configs, "experiment_id": eid},
        )
        return eid

    def run(self, experiment_id: str | None = None, variation: int = 0) -> str:
        """A new pending run; returns its path ``/v1/runs/e/v/r``."""
        eid = experiment_id or self.experiment()
        info = self.ok("POST", f"/v1/experiments/{eid}/variations/{variation}/runs", 201)
        return f"/v1/runs/{eid}/{variation}/{info['run']}"

    def started(self, experiment_id: str | None = None, **start: Any) -> tuple[str, str]:
        """A new running run; returns its path and lease."""
        path = self.run(experiment_id)
        info = self.ok("POST", f"{path}/start", json=start or None)
        assert info["state"] == "running" and info["lease"]
        return path, info["lease"]

    def state(self, path: str) -> str:
        return str(self.ok("GET", path)["state"])

    def upload(self, run_path: str, name: str, data: bytes, lease: str | None = None) -> Any:
        """A whole upload in one chunk; returns the AssetInfo."""
        status = self.ok(
            "POST",
            f"{run_path}/uploads",
            201,
            json={"name": name, "size": len(data), "lease": lease},
        )
        uid = status["upload_id"]
        self.ok("PUT", f"/v1/uploads/{uid}", params={"offset": 0}, data=data)
        return self.ok(
            "POST", f"/v1/uploads/{uid}/complete", json={"sha256": hashlib.sha256(data).hexdigest()}
        )
