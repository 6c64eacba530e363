"""Simulated annotators: a crowd that labels a project through the same HTTP API as people do.

    rlhfkit annotate simulate url=http://127.0.0.1:8000 token=ADMIN_TOKEN project=p preference=prefs.py:score \
        crowd=5 temperature=1.0 length_bias=0.05

Each annotator judges with a programmatic preference: fn(prompts, completions) -> list[float] (the
rlhfkit.plugins signature, the same as reward functions), plus optional biases, plus Bradley-Terry noise:

    utility   u = score + length_bias * words(completion)         (+ position_bias for the left completion A)
    pairwise  d' = u_A - u_B + T * Logistic(0, 1)  =>  P(A) = sigmoid((u_A - u_B) / T)  (Bradley-Terry, T: temperature)
              label = tie if |d'| <= tie_margin, else A or B; strength = 1 + [|d'| > 1] + [|d'| > 2]
    rating    each criterion: round(min + (max - min) * sigmoid((u + T * Logistic(0, 1)) / rating_spread))
    edit      edit_function(prompts, completions) -> list[str] if given; otherwise edit items are skipped

The noise-free label uses the plain score (no noise, no biases): the report gives how often the crowd's labels,
and the majority of each item, match it. Requests are retried with the same client_key when the server is
unreachable or busy, so a label is stored once even if the server restarts mid-run.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable

import httpx

from rlhfkit.errors import UserError
from rlhfkit.plugins import call_scorer


@dataclass
class CrowdSpec:
    crowd: int = 5
    """Number of simulated annotators, labelling concurrently."""
    temperature: float = 1.0
    """Bradley-Terry temperature T: 0 answers by the score alone, larger is noisier."""
    length_bias: float = 0.0
    """Added to a completion's utility per word (0.1: ten more words are worth one score unit)."""
    position_bias: float = 0.0
    """Added to the utility of the left completion (A)."""
    tie_margin: float = 0.0
    """|utility difference| at or below which the label is a tie (0: never a tie)."""
    rating_spread: float = 1.0
    """Score units that move a rating across the middle of the scale (sigmoid width)."""
    max_labels: int = 0
    """Labels per annotator before it stops (0: until the queue is empty)."""
    seed: int = 0
    """Seed of the annotators' noise (annotator i uses seed + i)."""
    name_prefix: str = "sim"
    """Simulated users are named PREFIX0, PREFIX1, ... (created if missing)."""
    retry_seconds: float = 60.0
    """How long one request keeps retrying while the server is unreachable or answers 5xx."""


@dataclass
class SimReport:
    labels: int = 0
    by_kind: dict = field(default_factory=dict)
    seconds: float = 0.0
    labels_per_s: float = 0.0
    agreement_with_noise_free: float | None = None
    """Share of pairwise labels equal to the noise-free label."""
    majority_agreement_with_noise_free: float | None = None
    """Share of pairwise items whose majority label (ties of votes skipped) equals the noise-free label."""
    rating_mae: float | None = None
    """Mean absolute difference between the simulated ratings and the noise-free ratings."""
    retries: int = 0
    replays: int = 0
    """Labels the server already had (a retried request whose first answer was lost): counted once."""
    skipped_edits: int = 0
    acknowledged: list = field(default_factory=list)
    """(annotator, client_key, label_id) of every label the server confirmed."""

    def summary(self) -> str:
        parts = [f"{self.labels} labels in {self.seconds:.1f}s ({self.labels_per_s:.1f} labels/s)"]
        if self.agreement_with_noise_free is not None:
            parts.append(f"agreement with noise-free labels {self.agreement_with_noise_free:.3f} per label, "
                         f"{self.majority_agreement_with_noise_free:.3f} by majority")
        if self.rating_mae is not None:
            parts.append(f"rating MAE vs noise-free {self.rating_mae:.3f}")
        if self.retries:
            parts.append(f"{self.retries} retried requests")
        return "; ".join(parts)

    def to_dict(self, with_acks: bool = False) -> dict:
        d = asdict(self)
        if not with_acks:
            d.pop("acknowledged")
        return d


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _logistic(rng: random.Random) -> float:
    u = min(max(rng.random(), 1e-12), 1 - 1e-12)
    return math.log(u / (1 - u))


def _words(text) -> int:
    if isinstance(text, list):
        text = " ".join(m.get("content", "") for m in text)
    return len(str(text).split())


def noise_free_choice(score_a: float, score_b: float, tie_margin: float = 0.0) -> str:
    d = score_a - score_b
    return "tie" if abs(d) <= tie_margin else ("A" if d > 0 else "B")


def noisy_choice(rng: random.Random, u_a: float, u_b: float, spec: CrowdSpec) -> tuple[str, int | None]:
    """Bradley-Terry: d' = u_A - u_B + T * logistic noise, so P(A) = sigmoid((u_A - u_B) / T)."""
    d = u_a - u_b + (spec.temperature * _logistic(rng) if spec.temperature > 0 else 0.0)
    if abs(d) <= spec.tie_margin:
        return "tie", None
    return ("A" if d > 0 else "B"), 1 + int(abs(d) > 1) + int(abs(d) > 2)


def rating_value(u: float, lo: int, hi: int, spread: float) -> int:
    return int(round(lo + (hi - lo) * _sigmoid(u / spread)))


class Scorer:
    """Caches fn(prompts, completions) per (prompt, completion) text."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.cache: dict[str, float] = {}

    def __call__(self, prompt, completions: list) -> list[float]:
        keys = [repr((prompt, c)) for c in completions]
        todo = [i for i, k in enumerate(keys) if k not in self.cache]
        if todo:
            values = call_scorer(self.fn, [prompt] * len(todo), [completions[i] for i in todo],
                                 what="simulate.preference")
            for i, v in zip(todo, values):
                self.cache[keys[i]] = v
        return [self.cache[k] for k in keys]


class _Client:
    def __init__(self, http: httpx.AsyncClient, token: str, report: SimReport, retry_seconds: float):
        self.http, self.headers, self.report, self.retry_seconds = http, {"Authorization": f"Bearer {token}"}, \
            report, retry_seconds

    async def call(self, method: str, path: str, json: dict | None = None) -> httpx.Response:
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.05
        while True:
            try:
                resp = await self.http.request(method, path, json=json, headers=self.headers)
                if resp.status_code < 500:
                    return resp
                problem = f"HTTP {resp.status_code}: {resp.text[:200]}"
            except httpx.TransportError as err:
                problem = f"{type(err).__name__}: {err}"
            if time.monotonic() > deadline:
                raise RuntimeError(f"{method} {path}: gave up after {self.retry_seconds:.0f}s ({problem})")
            self.report.retries += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


def _check(resp: httpx.Response, what: str) -> dict:
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail")
        except ValueError:
            detail = resp.text[:200]
        raise UserError(f"{what}: HTTP {resp.status_code}: {detail}")
    return resp.json()


async def _annotate(client: _Client, index: int, project_id: int, scorer: Scorer, spec: CrowdSpec,
                    edit_fn: Callable | None, out: list, report: SimReport, name: str) -> None:
    rng = random.Random(spec.seed * 1_000_003 + index)
    skipped: set[int] = set()
    done = 0
    while not spec.max_labels or done < spec.max_labels:
        task = _check(await client.call("POST", f"/api/projects/{project_id}/next"), "next task")["task"]
        if task is None or task["item_id"] in skipped:
            return
        body: dict = {"item_id": task["item_id"], "client_key": uuid.uuid4().hex}
        record: dict = {"item_id": task["item_id"], "kind": task["kind"], "annotator": name}
        prompt, comps = task["prompt"], task["completions"]
        if task["kind"] == "pairwise":
            s = await asyncio.to_thread(scorer, prompt, comps)
            u = [s[i] + spec.length_bias * _words(c) for i, c in enumerate(comps)]
            u[0] += spec.position_bias
            choice, strength = noisy_choice(rng, u[0], u[1], spec)
            body.update(choice=choice, strength=strength)
            record.update(choice=choice, noise_free=noise_free_choice(s[0], s[1], spec.tie_margin))
        elif task["kind"] == "rating":
            (s,) = await asyncio.to_thread(scorer, prompt, comps)
            u = s + spec.length_bias * _words(comps[0])
            lo, hi = task["scale_min"], task["scale_max"]
            noise = (lambda: spec.temperature * _logistic(rng)) if spec.temperature > 0 else (lambda: 0.0)
            body["ratings"] = {c: rating_value(u + noise(), lo, hi, spec.rating_spread) for c in task["criteria"]}
            record.update(ratings=body["ratings"], noise_free=rating_value(s, lo, hi, spec.rating_spread))
        else:
            if edit_fn is None:
                skipped.add(task["item_id"])
                report.skipped_edits += 1
                await client.call("POST", f"/api/tasks/{task['item_id']}/release")
                continue
            edited = edit_fn([prompt], comps)[0]
            if not isinstance(edited, str) or not edited.strip():
                raise UserError("simulate.edit_function: must return a list of non-empty strings")
            body["edited"] = edited
        resp = await client.call("POST", "/api/labels", body)
        label = _check(resp, f"label for item {task['item_id']}")
        report.replays += not label["created"]
        report.acknowledged.append((name, body["client_key"], label["label"]["id"]))
        out.append(record)
        done += 1


def _users(http: httpx.Client, spec: CrowdSpec, project: str) -> list[tuple[str, str]]:
    """Create (or reuse, with a fresh token) the simulated annotators and add them to the project."""
    out = []
    for i in range(spec.crowd):
        name = f"{spec.name_prefix}{i}"
        resp = http.post("/api/users", json={"name": name, "role": "annotator", "projects": [project]})
        if resp.status_code == 409:
            token = _check(http.post(f"/api/users/{name}/token"), f"token for {name}")["token"]
            pid = _project_id(http, project)
            _check(http.post(f"/api/projects/{pid}/members", json={"user": name}), f"add {name} to {project}")
        else:
            token = _check(resp, f"create user {name}")["token"]
        out.append((name, token))
    return out


def _project_id(http: httpx.Client, project: str) -> int:
    for p in _check(http.get("/api/projects"), "list projects"):
        if p["name"] == project:
            return p["id"]
    raise UserError(f"project {project!r} not found on the server")


def simulate(url: str, admin_token: str, project: str, preference: Callable, *, spec: CrowdSpec | None = None,
             edit_function: Callable | None = None, report: SimReport | None = None) -> SimReport:
    """Label `project` on the server at `url` with a simulated crowd; returns a SimReport (pass `report` to watch
    `report.acknowledged` grow from another thread)."""
    spec = spec or CrowdSpec()
    if spec.crowd < 1:
        raise UserError(f"crowd: must be >= 1, got {spec.crowd}")
    if spec.temperature < 0 or spec.rating_spread <= 0 or spec.tie_margin < 0:
        raise UserError("temperature and tie_margin must be >= 0, rating_spread > 0")
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=60) as http:
        try:
            me = http.get("/api/me")
        except httpx.TransportError as err:
            raise UserError(f"url: cannot reach {url} ({err})") from None
        if _check(me, "admin token")["role"] != "admin":
            raise UserError("token: simulate needs an admin token (it creates the simulated annotators)")
        project_id = _project_id(http, project)
        users = _users(http, spec, project)
    scorer = Scorer(preference)
    report = report if report is not None else SimReport()
    records: list[dict] = []

    async def run() -> None:
        limits = httpx.Limits(max_connections=spec.crowd + 4, max_keepalive_connections=spec.crowd + 4)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
            await asyncio.gather(*[
                _annotate(_Client(http, token, report, spec.retry_seconds), i, project_id, scorer, spec,
                          edit_function, records, report, name) for i, (name, token) in enumerate(users)])

    start = time.perf_counter()
    asyncio.run(run())
    report.seconds = time.perf_counter() - start
    report.labels = len(records)
    report.by_kind = dict(Counter(r["kind"] for r in records))
    report.labels_per_s = report.labels / report.seconds if report.seconds > 0 else 0.0
    _score_against_noise_free(records, report)
    return report


def _score_against_noise_free(records: list[dict], report: SimReport) -> None:
    pair = [r for r in records if r["kind"] == "pairwise"]
    if pair:
        report.agreement_with_noise_free = round(sum(r["choice"] == r["noise_free"] for r in pair) / len(pair), 4)
        by_item: dict[int, list] = defaultdict(list)
        for r in pair:
            by_item[r["item_id"]].append(r)
        hits = total = 0
        for votes in by_item.values():
            (top, n), *rest = Counter(v["choice"] for v in votes).most_common() + [(None, 0)]
            if rest and rest[0][1] == n:
                continue
            total += 1
            hits += top == votes[0]["noise_free"]
        report.majority_agreement_with_noise_free = round(hits / total, 4) if total else None
    rated = [r for r in records if r["kind"] == "rating"]
    if rated:
        errs = [abs(v - r["noise_free"]) for r in rated for v in r["ratings"].values()]
        report.rating_mae = round(sum(errs) / len(errs), 4)
