"""A stand-in for `vllm serve` (vLLM 0.11.0's entrypoints/openai/api_server.py and serving_completion.py) that
answers exactly the HTTP calls tether's vllm-server backend makes, on CPU, with fake_vllm's engine behind it:

- `GET /version` -> {"version"}; `POST /v1/completions` with CompletionRequest's own field names (any other
  name is refused here, so a misspelt field fails the test rather than being ignored), token-id prompts
  (`prompt` a list of lists of ints), `n`, `logprobs`, `return_token_ids`; choices numbered prompt-major
  (`index=len(choices)`), `logprobs.token_logprobs` clamped at -9999.0, `token_ids` and `prompt_token_ids`
  only with `return_token_ids`;
- with VLLM_SERVER_DEV_MODE (`dev_mode`): `POST /collective_rpc` {"method", "args", "kwargs", "timeout"} ->
  {"results": [one per worker]} (results that are not dict, list or None come back as str), `POST
  /reset_prefix_cache`; without it those paths are 404, as routes that do not exist are. A method that raises
  (one the workers do not have included) is a 500.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMPLETION_FIELDS = {  # CompletionRequest in vLLM 0.11.0's protocol.py (the fields tether could send)
    "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n",
    "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p", "user",
    "use_beam_search", "top_k", "min_p", "repetition_penalty", "length_penalty", "stop_token_ids",
    "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens",
    "spaces_between_special_tokens", "truncate_prompt_tokens", "allowed_token_ids", "prompt_logprobs",
    "add_special_tokens", "priority", "request_id", "return_tokens_as_token_ids", "return_token_ids",
    "cache_salt", "vllm_xargs"}


class FakeVLLMServer:
    def __init__(self, vllm, model: str, *, dev_mode: bool = True, tensor_parallel_size: int = 2,
                 logprobs_mode: str = "processed_logprobs",
                 worker_extension_cls: str = "tether.rollout.vllm_server.WeightReceiver"):
        self.vllm, self.dev_mode = vllm, dev_mode
        self.llm = vllm.LLM(model, dtype="bfloat16", logprobs_mode=logprobs_mode, enable_prefix_caching=True,
                            tensor_parallel_size=tensor_parallel_size,
                            **({"worker_extension_cls": worker_extension_cls} if worker_extension_cls else {}))
        self.requests: list[tuple[str, dict | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code: int, body=None):
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                server.requests.append((self.path, None))
                if self.path == "/version":
                    return self.reply(200, {"version": server.vllm.__version__})
                self.reply(404, {"detail": "Not Found"})

            def do_POST(self):
                path = self.path.split("?")[0]
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
                server.requests.append((path, body))
                routes = {"/v1/completions": server.completions}
                if server.dev_mode:
                    routes.update({"/collective_rpc": server.collective_rpc,
                                   "/reset_prefix_cache": server.reset_prefix_cache})
                if path not in routes:
                    return self.reply(404, {"detail": "Not Found"})
                try:
                    code, out = routes[path](body)
                except Exception as e:  # what FastAPI answers for an exception in a route
                    server.last_error = e
                    return self.reply(500, {"detail": "Internal Server Error"})
                self.reply(code, out)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def completions(self, body: dict):
        unknown = set(body) - COMPLETION_FIELDS
        if unknown:
            return 400, {"error": {"message": f"unknown fields {sorted(unknown)}", "type": "BadRequestError",
                                   "code": 400}}
        prompts = body["prompt"]
        if not (isinstance(prompts, list) and all(isinstance(p, list) for p in prompts)):
            return 400, {"error": {"message": "this contract expects token-id prompts", "type": "BadRequestError",
                                   "code": 400}}
        defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}  # CompletionRequest's, for a field left None
        given = {k: body[k] if body.get(k) is not None else v for k, v in defaults.items()}
        params = self.vllm.SamplingParams(
            n=body.get("n", 1), **given, max_tokens=body.get("max_tokens", 16), logprobs=body.get("logprobs"),
            seed=body.get("seed"), stop_token_ids=body.get("stop_token_ids") or [])
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        choices = []
        for final in outputs:
            for o in final.outputs:
                logprobs = None
                if body.get("logprobs") is not None:
                    lps = [max(lp[t].logprob, -9999.0) for t, lp in zip(o.token_ids, o.logprobs)]
                    logprobs = {"text_offset": [0] * len(o.token_ids), "tokens": [str(t) for t in o.token_ids],
                                "token_logprobs": lps, "top_logprobs": [{str(t): v} for t, v in zip(o.token_ids, lps)]}
                choices.append({"index": len(choices), "text": "", "logprobs": logprobs,
                                "finish_reason": o.finish_reason, "stop_reason": None,
                                "token_ids": list(o.token_ids) if body.get("return_token_ids") else None,
                                "prompt_logprobs": None,
                                "prompt_token_ids": (final.prompt_token_ids if body.get("return_token_ids")
                                                     else None)})
        return 200, {"id": "cmpl-0", "object": "text_completion", "model": "fake", "choices": choices,
                     "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}

    def collective_rpc(self, body: dict):
        if body.get("method") is None:
            return 400, {"detail": "Missing 'method' in request body"}
        results = self.llm.collective_rpc(body["method"], timeout=body.get("timeout"),
                                          args=tuple(body.get("args", [])), kwargs=body.get("kwargs", {}))
        return 200, {"results": [r if r is None or isinstance(r, (dict, list)) else str(r) for r in results]}

    def reset_prefix_cache(self, body):
        self.llm.reset_prefix_cache()
        return 200, None
