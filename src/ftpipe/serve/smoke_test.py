"""`ftpipe smoke-test`: ask the served model real chat questions and check the answers.

Where it sits: after `ftpipe serve` (any artifact). With the official `openai` client it sends the
first `smoke_test.prompts` val conversations of the run's dataset (greedy) and checks that every
answer is non-empty and ends at EOS (finish_reason "stop", not "length"); it compares the server's
tokenization of chat messages (vLLM `/tokenize`) with HF `apply_chat_template` on the served
folder's tokenizer; and when `eval.prompts_file` exists it runs its checks, parsed and judged as
eval-sft does (`ftpipe.handoff.checks`; `must_stop` = finish_reason "stop"). The val prompts are
`ftpipe.handoff.prepared.prompt` of each conversation. With several served names (`serve.artifact`
adapters: <run>-base, <run>-sft, <run>-dpo) every name is checked the same way and recorded apart
(results.json `models`, manifest metrics `models`); the tuned adapters must pass, the base's answers
and checks are recorded as the baseline, not judged (a base model need not stop at its end of turn).
It checks what the server really serves: when `ftpipe serve` recorded (server.json) another
artifact than serve.artifact at this address (`serve --fallback` on a CPU that cannot run AWQ, or a
server started by hand), that artifact, and results.json says which was asked for and why.
A server that fails (HTTP 5xx, a reset or refused connection, a timeout, an answer that is not the
API's JSON) fails the stage in one line that quotes the cause from the server's log
(`ftpipe.serve.server_record.root_cause`). Results go to logs/<run>/smoke-test/results.json, the
manifest beside it.

`check(ctx)` works out from files alone (server.json, the last results.json, the upstream manifests,
the val split) which artifact is served and returns the inputs to compare; `plan(ctx)` adds the
prompt checks (`SmokeTestPlan`); `run(ctx, plan)` asks the server.

    ftpipe smoke-test --config debug_config.yaml
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from ftpipe.core.errors import InputError, StageError
from ftpipe.core.fsutil import atomic_write_json, read_json
from ftpipe.core.stage import StageContext, StageResult
from ftpipe.handoff.checks import judge, load_checks
from ftpipe.handoff.prepared import Messages, split_prompts
from ftpipe.serve.served import Served, base_url, resolve_artifact
from ftpipe.serve.server_record import ServerState, alive, log_size, read_state, root_cause, server_log_path

log = logging.getLogger(__name__)

RESULTS = "results.json"


@dataclass(frozen=True)
class SmokeTestPlan:
    """What the smoke test checks, worked out from files before the first request."""

    served: Served  # what the server at the smoke test's address serves
    server: ServerState | None  # server.json's record of that server (None: no ftpipe server of this run there)
    served_why: Mapping[str, str]  # {"artifact_reason"}, plus "requested_artifact" when it is not serve.artifact
    val_file: Path  # prepared/<data.name>/val.jsonl
    prompts: tuple[Messages, ...]  # the prompts of its first smoke_test.prompts conversations
    checks_file: Path | None  # eval.prompts_file when it exists and smoke_test.prompt_checks is on
    checks: tuple[dict[str, Any], ...] = ()  # its checks (`ftpipe.handoff.checks.load_checks`)


def endpoint(cfg) -> str:
    """The OpenAI base URL (…/v1) the smoke test talks to."""
    if cfg.smoke_test.base_url:
        return cfg.smoke_test.base_url.rstrip("/")
    return base_url(cfg.serve.host, cfg.serve.port) + "/v1"


def check_verdict(check: dict[str, Any], answer: str, finish_reason: str | None) -> dict[str, Any]:
    """One prompt check's result from the served model's answer, judged as eval-sft judges it.

    Args:
        check: a check of `ftpipe.handoff.checks.load_checks`.
        answer: the OpenAI chat answer's text.
        finish_reason: its finish_reason; `must_stop` holds for "stop" (the model ended its turn),
            not "length" (cut at `smoke_test.max_tokens`).

    Returns:
        {"name", "prompt", "answer", "finish_reason", "passed", "problems"}: problems are the
        failed expectations (`ftpipe.handoff.checks.judge`).
    """
    problems = judge(answer, finish_reason == "stop", check["expect"])
    return {"name": check["name"], "prompt": check["prompt"], "answer": answer, "finish_reason": finish_reason,
            "passed": not problems, "problems": problems}


class MalformedAnswer(Exception):
    """The server answered 200 with something that is not the API's JSON (`what`: the request)."""

    def __init__(self, message: str, what: str) -> None:
        super().__init__(message)
        self.what = what


CHAT = "POST /v1/chat/completions"


def _chat(client, model: str, messages, max_tokens: int) -> tuple[str, str | None]:
    try:
        response = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0.0)
    except json.JSONDecodeError as exc:
        raise MalformedAnswer(str(exc), CHAT) from exc
    if not getattr(response, "choices", None) or getattr(response.choices[0], "message", None) is None:
        raise MalformedAnswer(f"a chat completion without choices: {str(response)[:120]!r}", CHAT)
    choice = response.choices[0]
    return choice.message.content or "", choice.finish_reason


def _ask_all(client, model: str, conversations: list, max_tokens: int, in_flight: int) -> list[tuple[str, str | None]]:
    """Every conversation's (answer, finish_reason), in order, with up to `in_flight` requests at once.

    vLLM batches requests that arrive together, so 20 checks take about as long as one; greedy
    answers are the same as one at a time. llama.cpp's server answers one request at a time: it is
    asked with `in_flight` 1, so no request waits in its queue past `smoke_test.timeout`.

    Raises:
        the first failed request's error (openai / httpx error, `MalformedAnswer`), in order.
    """
    if in_flight <= 1 or len(conversations) <= 1:
        return [_chat(client, model, messages, max_tokens) for messages in conversations]
    with ThreadPoolExecutor(max_workers=min(in_flight, len(conversations))) as pool:
        return list(pool.map(lambda messages: _chat(client, model, messages, max_tokens), conversations))


def server_failure(exc: BaseException, url: str, server_log: Path | None, since: int, project, pid: int | None) -> StageError:
    """One line for a server that failed a request: what failed, and the cause its log gives.

    Args:
        exc: an openai / httpx error, or `MalformedAnswer`.
        server_log: the server's log (None when no ftpipe server runs at that address).
        since: the log's size when the smoke test began; the cause is looked for from there.
        pid: the server's pid from server.json, to say whether it is still running.
    """
    try:
        request = getattr(exc, "request", None)
    except RuntimeError:  # httpx: "The .request property has not been set."
        request = None
    what = getattr(exc, "what", None) or (f"{request.method} {request.url.path}" if request is not None else "a request")
    status = getattr(exc, "status_code", None) or getattr(getattr(exc, "response", None), "status_code", None)
    if status is not None:
        body = getattr(exc, "body", None)
        detail = (body.get("message") if isinstance(body, dict) else None) or getattr(exc, "message", None) or str(exc)
        failed = f"{what} answered HTTP {status} ({' '.join(str(detail).split())[:160]})"
    elif isinstance(exc, MalformedAnswer):
        failed = f"{what} answered something that is not the API's JSON ({' '.join(str(exc).split())[:120]})"
    else:  # connection refused / reset, timeout
        cause = exc.__cause__ or exc.__context__
        failed = f"{what} got no answer: {type(exc).__name__}{f' ({type(cause).__name__}: {cause})' if cause else ''}"
        if "Timeout" in type(exc).__name__:
            failed += " within smoke_test.timeout"
    message = f"smoke-test: the server at {url} failed: {failed}"
    if pid is not None and not alive(pid):
        message += f"; the server (pid {pid}) is no longer running"
    if server_log is None:
        return StageError(message + "; no ftpipe server log for this address (the server was not started by ftpipe serve)",
                          hint="read the server's own log")
    cause, earlier = root_cause(server_log, since), None
    if cause is None:  # nothing new: the server may have broken before the smoke test began
        earlier = root_cause(server_log)
    if cause:
        message += f"; {project.rel(server_log)} says: {cause}"
    elif earlier:
        message += f"; nothing new in {project.rel(server_log)}, whose last error (before this smoke test) is: {earlier}"
    else:
        message += f"; no error line in {project.rel(server_log)}"
    return StageError(message, hint=f"read {project.rel(server_log)}")


def template_matches(url: str, api_key: str | None, model: str, tokenizer_dir: Path, messages, timeout: float) -> dict[str, Any]:
    """Token ids of vLLM `/tokenize` (messages) vs HF `apply_chat_template`.

    Returns:
        equal, server_tokens, hf_tokens; when they differ, first_difference and the decoded text
        of both from there (what a wrongly rendered prompt looks like, for results.json).
    """
    import httpx
    from transformers import AutoTokenizer

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": model, "messages": messages, "add_generation_prompt": True}
    response = httpx.post(url.removesuffix("/v1") + "/tokenize", json=body, headers=headers, timeout=timeout)
    response.raise_for_status()
    try:
        server_ids = list(response.json()["tokens"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise MalformedAnswer(f"no token list: {response.text[:120]!r}", "POST /tokenize") from exc
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    hf = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    hf_ids = list(hf["input_ids"] if hasattr(hf, "keys") else hf)
    out: dict[str, Any] = {"equal": server_ids == hf_ids, "server_tokens": len(server_ids), "hf_tokens": len(hf_ids)}
    if server_ids != hf_ids:
        first = next((i for i, (a, b) in enumerate(zip(server_ids, hf_ids)) if a != b), min(len(server_ids), len(hf_ids)))
        out.update(first_difference=first, server_text=tokenizer.decode(server_ids[first:first + 24]),
                   hf_text=tokenizer.decode(hf_ids[first:first + 24]))
    return out


def run(ctx: StageContext, plan: SmokeTestPlan) -> StageResult:
    """Send the requests, check them, write results.json; raise listing every failed check."""
    import httpx
    import openai

    cfg = ctx.config
    st = cfg.smoke_test
    served = plan.served
    url = endpoint(cfg)
    key = cfg.serve.api_key.get_secret_value() if cfg.serve.api_key is not None else None
    client = openai.OpenAI(base_url=url, api_key=key or "EMPTY", timeout=st.timeout, max_retries=0)
    hint = f"ftpipe serve --run {ctx.run.name} --artifact {served.artifact} --detach"
    server = plan.server
    # The log of the server at this address: server.json's; without one, the run's serve log unless
    # smoke_test.base_url points elsewhere (another server's log would quote another failure).
    server_log = ctx.project.resolve(server.log) if server is not None else (
        server_log_path(ctx.run) if not st.base_url else None)
    server_log = server_log if server_log is not None and server_log.is_file() else None
    since = log_size(server_log) if server_log is not None else 0
    try:
        try:
            models = [m.id for m in client.models.list().data]
        except json.JSONDecodeError as exc:
            raise MalformedAnswer(str(exc), "GET /v1/models") from exc
    except openai.APIConnectionError:
        raise InputError(f"no server answers at {url}", hint=hint) from None
    except openai.AuthenticationError:
        raise InputError(f"{url} refused our API key (401)", hint="pass the server's key: --api-key or FTPIPE_API_KEY") from None
    except (openai.APIStatusError, MalformedAnswer) as exc:
        raise server_failure(exc, url, server_log, since, ctx.project, server.pid if server else None) from None
    missing = [n for n in served.names if n not in models]
    if missing:
        raise StageError(f"{url} does not serve model {', '.join(map(repr, missing))} (it serves {', '.join(models) or 'nothing'})",
                         hint=hint)
    log.info("smoke-test: %s serves %s", url, ", ".join(models))

    checks = list(plan.checks)
    per_model: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for name in served.names:
        judged = name != served.baseline  # the base next to adapters: recorded as the baseline
        try:
            result = _check_model(ctx, plan, client, url, key, name, checks)
        except (openai.APIError, httpx.HTTPError, MalformedAnswer) as exc:
            raise server_failure(exc, url, server_log, since, ctx.project, server.pid if server else None) from None
        result["judged"] = judged
        per_model[name] = result
        if judged:
            prefix = f"{name}: " if len(served.names) > 1 else ""
            problems += [prefix + p for p in result["problems"]]
        elif result["problems"]:
            log.info("%s (baseline, not judged): %s", name, "; ".join(result["problems"]))

    main = per_model[served.name]
    results_path = ctx.log_dir / RESULTS
    atomic_write_json(results_path, {
        "url": url, "model": served.name, "artifact": served.artifact, **plan.served_why, "answers": main["answers"],
        "chat_template": main["chat_template"], "prompt_checks": main["prompt_checks"], "problems": problems,
        "models": per_model,
    })
    metrics: dict[str, Any] = _model_metrics(main)
    if len(served.names) > 1:
        metrics["models"] = {n: {**_model_metrics(r), "judged": r["judged"]} for n, r in per_model.items()}
        metrics["requests"] = sum(m["requests"] for m in metrics["models"].values())
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        who = ", ".join(n for n in served.names if n != served.baseline)
        raise StageError(f"smoke-test of {who} at {url}: {len(problems)} problem(s): {shown}",
                         hint=f"read {ctx.project.rel(results_path)}")
    summary = (f"smoke-test passed: {metrics['answers']} answers stopped at EOS, "
               f"template {'matches' if main['chat_template'].get('equal') else 'not checked'}, "
               f"{metrics['checks_passed']}/{metrics['checks']} prompt checks")
    if len(served.names) > 1:
        summary = "smoke-test passed: " + "; ".join(
            f"{n}{'' if r['judged'] else ' (baseline, not judged)'}: {sum(a['ok'] for a in r['answers'])}/"
            f"{len(r['answers'])} answers stopped at EOS, template "
            f"{'matches' if r['chat_template'].get('equal') else 'differs' if r['chat_template'].get('checked') else 'not checked'}, "
            f"{sum(c['passed'] for c in r['prompt_checks'])}/{len(r['prompt_checks'])} prompt checks"
            for n, r in per_model.items())
    return StageResult(outputs=[results_path], metrics=metrics, summary=summary)


def _check_model(ctx: StageContext, plan: SmokeTestPlan, client, url: str, key: str | None, name: str,
                 checks: list[dict[str, Any]]) -> dict[str, Any]:
    """Val answers, the chat template and the prompt checks of one served model name.

    Returns:
        {"answers", "chat_template", "prompt_checks", "problems"} (problems: what failed, unprefixed).
    """
    st, served = ctx.config.smoke_test, plan.served
    check_messages = [([{"role": "system", "content": c["system"]}] if c["system"] else []) + [
        {"role": "user", "content": c["prompt"]}] for c in checks]
    replies = _ask_all(client, name, [*plan.prompts, *check_messages], st.max_tokens,
                       st.concurrency if served.kind == "vllm" else 1)
    problems: list[str] = []
    answers = []
    for i, messages in enumerate(plan.prompts):
        text, finish = replies[i]
        ok = bool(text.strip()) and finish == "stop"
        if not text.strip():
            problems.append(f"val[{i}]: empty answer")
        elif finish != "stop":
            problems.append(f"val[{i}]: did not stop at EOS within {st.max_tokens} tokens (finish_reason {finish})")
        answers.append({"index": i, "prompt": messages[-1]["content"], "answer": text, "finish_reason": finish, "ok": ok})
        log.info("%s val[%d]: %r -> %r (%s)", name, i, messages[-1]["content"][:60], text[:60], finish)

    template: dict[str, Any] = {"checked": False}
    if st.check_template and served.kind == "vllm" and served.tokenizer_dir is not None:
        template = {"checked": True, **template_matches(url, key, name, served.tokenizer_dir, plan.prompts[0], st.timeout)}
        if not template["equal"]:
            problems.append(f"chat template: the server's prompt tokens ({template['server_tokens']}) differ from HF "
                            f"apply_chat_template ({template['hf_tokens']}) for {ctx.project.rel(served.tokenizer_dir)} "
                            f"from token {template['first_difference']}: server {template['server_text']!r}, "
                            f"HF {template['hf_text']!r}")
    elif st.check_template:
        template["reason"] = "llama.cpp's server has no chat /tokenize" if served.kind != "vllm" else "no tokenizer folder"
        log.info("chat template check skipped: %s", template["reason"])

    checks_out = [check_verdict(check, *reply) for check, reply in zip(checks, replies[len(plan.prompts):])]
    if checks_out:
        passed = sum(c["passed"] for c in checks_out)
        rate = passed / len(checks_out)
        if rate < st.min_check_pass_rate:
            failed = [c for c in checks_out if not c["passed"]]
            first = "; ".join(f"{c['name']}: answer {c['answer'].strip()[:40]!r}: {'; '.join(c['problems'])}" for c in failed[:2])
            problems.append(f"prompt checks: {passed}/{len(checks_out)} passed ({rate:.0%}) < "
                            f"smoke_test.min_check_pass_rate {st.min_check_pass_rate:.0%} ({first})")
    return {"answers": answers, "chat_template": template, "prompt_checks": checks_out, "problems": problems}


def _model_metrics(result: dict[str, Any]) -> dict[str, Any]:
    answers, checks, template = result["answers"], result["prompt_checks"], result["chat_template"]
    metrics = {
        "requests": len(answers) + len(checks),
        "answers_ok": sum(a["ok"] for a in answers),
        "answers": len(answers),
        "template_equal": template.get("equal"),
        "checks_passed": sum(c["passed"] for c in checks),
        "checks": len(checks),
    }
    if checks:
        metrics["check_accuracy"] = round(metrics["checks_passed"] / len(checks), 4)
    return metrics


def check(ctx: StageContext) -> dict[str, Path]:
    """The inputs to compare: the served artifact's manifest (and the DPO adapter's, when served),
    the val split and the prompt-checks file.

    Pure and cheap: it reads server.json (a stale one is left for `plan` to remove), the last
    results.json and the upstream manifests, and asks no server anything. The smoke test always
    runs when called on its own (a server that was up yesterday proves nothing today: its row in
    the stage table says so); `ftpipe run` asks this first and does not even start a server when
    the same artifact, prompts and config passed.

    Raises:
        InputError: the artifact's stage has not completed, or no val split.
    """
    survey = _survey(ctx, remove_stale=False)
    inputs = {"artifact": survey.served.upstream_manifest, "val": survey.val_file}
    if any(folder == ctx.run.path / "dpo_adapter" for _, folder in survey.served.loras):
        inputs["dpo_artifact"] = ctx.run.manifest_path(ctx.producers["dpo_adapter"])
    if survey.checks_file is not None:
        inputs["prompts_file"] = survey.checks_file
    return inputs


def plan(ctx: StageContext) -> SmokeTestPlan:
    """What to check: the artifact the server at this address really serves, the val prompts, the
    prompt checks (read and validated here).

    Raises:
        InputError: as `check`; a prompt-checks file that is not valid (naming the file).
    """
    cfg, project = ctx.config, ctx.project
    survey = _survey(ctx, remove_stale=True)
    server, why = survey.server, survey.served_why
    if server is not None and "requested_artifact" in why:
        log.warning("smoke-test: the server at %s serves %s, not serve.artifact %s (%s): checking %s",
                    server.url, server.artifact, cfg.serve.artifact, why["artifact_reason"], server.artifact)
    if cfg.smoke_test.prompt_checks and cfg.eval.prompts_file and survey.checks_file is None:
        log.warning("eval.prompts_file %s does not exist: prompt checks skipped", cfg.eval.prompts_file)
    if survey.checks_file is None:
        return survey
    return replace(survey, checks=tuple(load_checks(survey.checks_file, project.rel(survey.checks_file))))


def _survey(ctx: StageContext, remove_stale: bool) -> SmokeTestPlan:
    """The plan but its checks (not read yet): the served artifact (through `ctx.producers`), the
    val prompts and the checks file, from files alone.

    Raises:
        InputError: the artifact's stage has not completed, or no val split.
    """
    cfg, project = ctx.config, ctx.project
    server, artifact, why = served_here(ctx, remove_stale)
    served = resolve_artifact(ctx.run, artifact, cfg.serve.gguf_type, producers=ctx.producers)
    val_file = project.prepared_dir(cfg.data.name) / "val.jsonl"
    if not val_file.is_file():
        raise InputError(f"no val split for dataset {cfg.data.name} ({project.rel(val_file)} missing)",
                         hint="ftpipe preprocess-sft")
    checks_file = None
    if cfg.smoke_test.prompt_checks and cfg.eval.prompts_file:
        candidate = project.resolve(cfg.eval.prompts_file)
        if candidate.is_file():
            checks_file = candidate
    prompts = tuple(split_prompts(val_file, cfg.smoke_test.prompts))
    return SmokeTestPlan(served, server, why, val_file, prompts, checks_file)


def served_here(ctx: StageContext, remove_stale: bool = True) -> tuple[ServerState | None, str, dict[str, str]]:
    """The run's server at the smoke test's address, the artifact it serves and why that one.

    Args:
        remove_stale: remove a stale server.json (False in `check`, which writes nothing).

    Returns:
        (server.json's record or None, artifact, {"artifact_reason": ...} plus "requested_artifact"
        when the server serves another artifact than serve.artifact).
    """
    cfg = ctx.config
    server = read_state(ctx.run, remove_stale)
    if server is not None and server.url.rstrip("/") != endpoint(cfg):
        server = None  # a server of this run, but not the one at smoke_test's address
    if server is None:
        # No server now (`ftpipe run` asking whether the check is up to date): when the last smoke
        # test served a replacement for this very serve.artifact, that is what a rerun would
        # serve again on this machine, so it is the input to compare.
        last = read_json(ctx.log_dir / RESULTS)
        if (isinstance(last, dict) and last.get("requested_artifact") == cfg.serve.artifact
                and last.get("artifact") not in (None, cfg.serve.artifact)):
            return None, str(last["artifact"]), {"requested_artifact": cfg.serve.artifact,
                                                 "artifact_reason": str(last.get("artifact_reason"))}
        return None, cfg.serve.artifact, {"artifact_reason": "serve.artifact"}
    if server.artifact == cfg.serve.artifact:
        return server, cfg.serve.artifact, {"artifact_reason": "serve.artifact"}
    why = server.extra.get("substitution") or f"the server at {server.url} was started with --artifact {server.artifact}"
    return server, server.artifact, {"requested_artifact": cfg.serve.artifact, "artifact_reason": why}
