"""``python -m bench.refresh``: the closed loop end to end, on the shipped defaults, with its figures.

The shift: MNIST digits rotated by 45 degrees (a camera mounted askew), which the bundled LeNet (trained with a few
degrees of rotation) gets wrong about a third of the time.

- ``run`` (the default): starts a server on a copy of ``models/mnist`` v1 with a fresh SQLite state store (every
  setting the shipped default except ``CONVSERVE_KEEP_INPUTS=1``); sends ``--labelled`` rotated training digits and
  labels them; scores v1 on rotated test digits; runs ``python -m training refresh`` with its defaults (the whole
  MNIST training set, 3 epochs); sends mixed traffic until the server's rollout decides; scores again. Prints the
  accuracy on the shifted traffic before and after, plain MNIST from the gate, the held-out figures, wall times.
- ``traffic --url U``: the first step against a server you started (the docs' worked example).
- ``score --url U``: accuracy on rotated test digits through a server's unversioned route.

The digits come from the local datasets (``--data-dir``) or keras.datasets' download. Progress to stderr.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench.servers import ServerSpec, running
from bench.targets import ROOT

ANGLE = 45


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def digits(data_dir: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from training.data import load_dataset
    from training.recipes import MNIST_LABELS

    ds = load_dataset("mnist", (28, 28, 1), MNIST_LABELS, data_dir)
    return ds.x_train, ds.y_train, ds.x_test, ds.y_test


def png(image: np.ndarray, angle: float = ANGLE) -> bytes:
    buffer = io.BytesIO()
    picture = Image.fromarray(image[..., 0])
    (picture.rotate(angle, resample=Image.Resampling.BILINEAR) if angle else picture).save(buffer, format="PNG")
    return buffer.getvalue()


def send_labelled(url: str, images: np.ndarray, labels: np.ndarray, prefix: str) -> float:
    """Rotated digits answered and labelled, as a client that learns the truth later; returns live accuracy."""
    right, feedback = 0, []
    with httpx.Client(timeout=30) as client:
        for i, (image, label) in enumerate(zip(images, labels)):
            r = client.post(f"{url}/models/mnist/predict", content=png(image),
                            headers={"Content-Type": "image/png", "X-Request-Id": f"{prefix}-{i}"})
            r.raise_for_status()
            right += r.json()["predictions"][0]["class_id"] == int(label)
            feedback.append({"id": f"{prefix}-{i}", "label": int(label)})
        for start in range(0, len(feedback), 1000):
            client.post(f"{url}/v2/models/mnist/feedback", json={"feedback": feedback[start:start + 1000]}
                        ).raise_for_status()
    return right / len(labels)


def score(url: str, images: np.ndarray, labels: np.ndarray, angle: float = ANGLE) -> tuple[float, dict[str, int]]:
    right, versions = 0, {}
    with httpx.Client(timeout=30) as client:
        for image, label in zip(images, labels):
            r = client.post(f"{url}/models/mnist/predict", content=png(image, angle),
                            headers={"Content-Type": "image/png"})
            r.raise_for_status()
            right += r.json()["predictions"][0]["class_id"] == int(label)
            versions[r.headers["x-model-version"]] = versions.get(r.headers["x-model-version"], 0) + 1
    return right / len(labels), versions


def followed(url: str, image: bytes, version: str, timeout: float = 30) -> bool:
    """Wait until every worker answers with ``version`` (50 answers in a row, a connection each, so they spread over
    the workers); False if that took longer than ``timeout``. Each worker follows a decision at its next sync
    (``CONVSERVE_ROLLOUT_SYNC_SECONDS``), so for up to a second some answers still come from the old stable."""
    deadline, streak = time.monotonic() + timeout, 0
    while streak < 50:
        if time.monotonic() >= deadline:
            return False
        r = httpx.post(f"{url}/models/mnist/predict", content=image, headers={"Content-Type": "image/png"}, timeout=30)
        streak = streak + 1 if r.headers.get("x-model-version") == version else 0
    return True


def mixed_traffic(url: str, pngs: list[bytes], stop: threading.Event, clients: int = 4) -> None:
    def run(i: int) -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                client.post(f"{url}/models/mnist/predict", content=pngs[i % len(pngs)],
                            headers={"Content-Type": "image/png", "X-Rollout-Key": f"client-{i % 97}"})
                i += clients

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join(timeout=30)


def cmd_run(args: argparse.Namespace) -> None:
    x_train, y_train, x_test, y_test = digits(args.data_dir)
    with tempfile.TemporaryDirectory(prefix="convserve-refresh-") as tmp_name:
        tmp = Path(tmp_name)
        models = tmp / "models"
        shutil.copytree(ROOT / "models" / "mnist", models / "mnist", ignore=shutil.ignore_patterns("report"))
        for extra in (models / "mnist").iterdir():
            if extra.is_dir() and extra.name != "1":
                shutil.rmtree(extra)
        state = f"sqlite:///{tmp}/state.sqlite"
        spec = ServerSpec(name="refresh", command=[sys.executable, "-m", "service", "--models-dir", str(models),
                                                   "--host", "127.0.0.1", "--port", "{port}"],
                          ready_path="/v2/health/ready", predict_path="/models/mnist/predict",
                          env={"CONVSERVE_STATE_URL": state, "CONVSERVE_KEEP_INPUTS": "1", "CONVSERVE_GRPC_PORT": "0"})
        with running(spec, ROOT, tmp) as server:
            url = server.base_url
            n = args.labelled
            say(f"1. {n} rotated training digits answered by v1 and labelled")
            live = send_labelled(url, x_train[-n:], y_train[-n:], "cam")
            test_x, test_y = x_test[:args.score], y_test[:args.score]
            before, _ = score(url, test_x, test_y)
            say(f"   v1 live accuracy on them {live:.2%}; on {len(test_y)} rotated test digits {before:.2%}")
            say("2. python -m training refresh (defaults)")
            started = time.monotonic()
            command = [sys.executable, "-m", "training", "refresh", "--model", "mnist", "--models-dir", str(models),
                       "--state-url", state, "--runs-dir", str(tmp / "runs"), *args.refresh_args]
            if args.data_dir:
                command += ["--data-dir", str(args.data_dir)]
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            refresh_wall = time.monotonic() - started
            if done.returncode != 0:
                say(done.stdout[-2000:] + done.stderr[-3000:])
                raise SystemExit(f"refresh exited {done.returncode}")
            metadata = json.loads((models / "mnist" / "2" / "metadata.json").read_text())
            say(f"   published v2 in {refresh_wall:.0f} s")
            say("3. mixed traffic (two thirds plain test digits, a third rotated) until the rollout decides")
            pool = [png(x, 0) for x in x_test[5000:5400]] + [png(x) for x in x_test[5400:5600]]
            stop = threading.Event()
            worker = threading.Thread(target=mixed_traffic, args=(url, pool, stop), daemon=True)
            started = time.monotonic()
            worker.start()
            seen: list[str] = []
            try:
                while time.monotonic() - started < args.timeout:
                    rollout = httpx.get(f"{url}/v2/models/mnist/rollout", timeout=30).json()
                    if not seen or seen[-1] != rollout["state"]:
                        seen.append(rollout["state"])
                        say(f"   {time.monotonic() - started:5.1f} s: {rollout['state']}")
                    if rollout["candidate"] is None and rollout["history"]:
                        break
                    time.sleep(0.5)
            finally:
                stop.set()
                worker.join(timeout=60)
            rollout_wall = time.monotonic() - started
            if not followed(url, pool[0], rollout["stable"]):
                say("   not every worker answers with the decided version yet: the figures below may mix versions")
            after, versions = score(url, test_x, test_y)
            plain, plain_versions = score(url, x_test[1000:1000 + args.score], y_test[1000:1000 + args.score],
                                          angle=0)
            say(f"   plain digits answered by {plain_versions}")
    decision = rollout["history"][0] if rollout["history"] else {}
    promotion, held = metadata["promotion"], metadata["feedback"]["held_out"]
    print(f"labelled rotated digits: {n} (v1 live accuracy {live:.2%})")
    print(f"rotated test digits ({len(test_y)}): v1 {before:.2%} -> after the loop {after:.2%} "
          f"(answered by {versions})")
    print(f"plain MNIST test set ({promotion['test_images']}, the gate): v1 {promotion['incumbent_accuracy']:.2%} "
          f"-> v2 {promotion['candidate_accuracy']:.2%}; through the server after the loop: {plain:.2%}")
    print(f"held-out feedback ({held['examples']}): v1 {held['stable_accuracy']:.2%} -> v2 "
          f"{held['candidate_accuracy']:.2%}")
    print(f"refresh wall {refresh_wall:.0f} s (training {metadata['training']['wall_seconds']:.0f} s); rollout "
          f"{' -> '.join(seen)} in {rollout_wall:.0f} s: {decision.get('decision')} ({decision.get('reason')})")
    agreement = decision.get("evidence", {}).get("guards", {}).get("agreement", {})
    print(f"agreement with v1 in the deciding phase: {agreement.get('value')} (threshold {agreement.get('threshold')}; "
          f"{agreement.get('detail')})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.refresh", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the whole loop on a server of its own (the default)")
    run.add_argument("--labelled", type=int, default=600, help="rotated digits labelled (default 600)")
    run.add_argument("--score", type=int, default=1000, help="test digits scored before and after (default 1000)")
    run.add_argument("--timeout", type=float, default=600, help="seconds to wait for the rollout's decision")
    run.add_argument("--refresh-args", nargs=argparse.REMAINDER, default=[],
                     help="more arguments for python -m training refresh (last)")
    traffic = sub.add_parser("traffic", help="send rotated training digits to a server and label them")
    traffic.add_argument("--count", type=int, default=600)
    scoring = sub.add_parser("score", help="accuracy on rotated test digits through a server")
    scoring.add_argument("--count", type=int, default=1000)
    for p in (traffic, scoring):
        p.add_argument("--url", default="http://127.0.0.1:8000")
    for p in (run, traffic, scoring):
        p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets",
                       help="local MNIST files (default ../shared/datasets; else keras.datasets downloads them)")
    raw = list(sys.argv[1:] if argv is None else argv)
    if not raw or raw[0] not in ("run", "traffic", "score", "-h", "--help"):
        raw = ["run", *raw]
    args = parser.parse_args(raw)
    if not args.data_dir.exists():
        args.data_dir = None
    if args.command == "traffic":
        x, y, _, _ = digits(args.data_dir)
        live = send_labelled(args.url, x[-args.count:], y[-args.count:], f"cam-{int(time.time())}")
        print(f"{args.count} rotated digits answered and labelled; live accuracy {live:.2%}")
    elif args.command == "score":
        _, _, x, y = digits(args.data_dir)
        accuracy, versions = score(args.url, x[:args.count], y[:args.count])
        print(f"{args.count} rotated test digits: {accuracy:.2%} (answered by versions {versions})")
    else:
        cmd_run(args)


if __name__ == "__main__":
    main()
