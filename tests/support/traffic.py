"""Clients sending MNIST digits to a server's unversioned predict route until stopped, for the rollout tests."""

from __future__ import annotations

import threading
from collections import Counter

import httpx


class Traffic:
    """``clients`` threads posting ``pngs`` in turn to ``urls`` in turn: every answer's status and version. With
    ``keyed``, client ``i`` sends ``X-Rollout-Key: client-<i>``, so a canary keeps each client on one arm.
    ``failures`` has every answer that was not a consistent 200 and every exception a client met."""

    def __init__(self, urls: list[str], pngs: list[bytes], clients: int = 3, keyed: bool = False) -> None:
        self.urls, self.pngs, self.keyed = urls, pngs, keyed
        self.statuses: Counter[int] = Counter()
        self.versions: Counter[str] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
            if t.is_alive():
                self.failures.append(f"{t.name} still running 30 s after it was stopped")

    def _run(self, seed: int) -> None:
        headers = {"Content-Type": "image/png"}
        if self.keyed:
            headers["X-Rollout-Key"] = f"client-{seed}"
        with httpx.Client(timeout=30) as client:
            i = seed
            while not self._stop.is_set():
                url = self.urls[i % len(self.urls)]
                png = self.pngs[i % len(self.pngs)]
                i += 1
                try:
                    r = client.post(f"{url}/models/mnist/predict", content=png, headers=headers)
                    self.statuses[r.status_code] += 1
                    if r.status_code == 200:
                        self.versions[r.headers["x-model-version"]] += 1
                        if str(r.json()["version"]) != r.headers["x-model-version"]:
                            self.failures.append(f"X-Model-Version {r.headers['x-model-version']}: {r.text[:200]}")
                    else:
                        self.failures.append(f"{r.status_code} {r.text[:200]}")
                except Exception as exc:  # noqa: BLE001 - a lost connection, or an answer without its fields
                    self.failures.append(repr(exc))
