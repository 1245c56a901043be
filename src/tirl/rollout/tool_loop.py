"""The tool-integrated rollout: generate, run the code the model wrote, show it the output, continue.

Each round generates for every unfinished trajectory at once; samples that paused on a closed ```python block
have their last block run in the sandbox in one concurrent batch, and the environment appends
```` ```output\\n…\\n``` ```` (long stdout as head … tail, an error as its last line). Tool tokens are appended with
``model_written=False`` so they never receive loss, and as plain text (special-token strings in them are not
parsed); rewards read only the model-written spans (``Trajectory.model_text``).

Everything that bounds a trajectory — its remaining token budget, tool rounds and self-correction attempts — is
its own: a trajectory is the same alone and in any batch (token for token with greedy decoding).

Self-correction (THOR): when a call fails, the failing block and ``backtrack_tokens`` tokens before it are
dropped and the model resamples from there, at most ``max_corrections`` times per call; then the error is kept
and the rollout goes on.
"""

from __future__ import annotations

from dataclasses import dataclass

from tirl.config.schema import RolloutConfig
from tirl.data.chat_template import encode_environment
from tirl.rollout.backend import GenerationBackend
from tirl.rollout.types import SamplingParams, ToolCall, Trajectory
from tirl.tools.text_format import last_code_block, output_block


@dataclass
class ToolLoop:
    backend: GenerationBackend
    sandbox: object                      # tirl.tools.sandbox.Sandbox: run_batch(codes) -> results
    tokenizer: object
    cfg: RolloutConfig

    def params(self, stop_at_code: bool = True) -> SamplingParams:
        """The sampling knobs every trajectory of a round shares; budgets are per trajectory (``budget``)."""
        return SamplingParams(
            max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
            top_p=self.cfg.top_p, top_k=self.cfg.top_k, stop_at_code=stop_at_code,
        )

    def budget(self, t: Trajectory) -> int:
        """Tokens ``t`` may write this round: at most ``max_new_tokens``, and what is left of ``max_total_tokens``."""
        return max(1, min(self.cfg.max_new_tokens, self.cfg.max_total_tokens - len(t.response_ids)))

    def _encode(self, text: str) -> list[int]:
        """Environment text as plain tokens: a printed ``<|im_end|>`` or ``</think>`` is never a special token."""
        return encode_environment(self.tokenizer, text)

    def run(self, prompts: list[list[int]], metas: list[dict] | None = None) -> list[Trajectory]:
        trajs = [Trajectory(prompt_ids=list(p), meta=dict(m)) for p, m in zip(prompts, metas or [{}] * len(prompts))]
        self.continue_(trajs)
        return trajs

    def continue_(self, trajs: list[Trajectory], max_tool_rounds: int | None = None) -> None:
        """Generate until every trajectory ends (EOS, token budget, or tool-round limit)."""
        max_rounds = self.cfg.max_tool_rounds if max_tool_rounds is None else max_tool_rounds
        rounds_left = {id(t): max_rounds - t.num_calls for t in trajs}
        tries = {id(t): 0 for t in trajs}            # self-correction attempts on the current failing call
        active = [t for t in trajs if len(t.response_ids) < self.cfg.max_total_tokens]
        for t in trajs:
            if t not in active:
                t.stop_reason = "length"
        while active:
            gens = self.backend.generate([t.prompt_ids + t.response_ids for t in active],
                                         self.params(stop_at_code=max_rounds > 0),
                                         max_new_tokens=[self.budget(t) for t in active])
            paused: list[tuple[Trajectory, int]] = []
            for t, g in zip(active, gens):
                start = len(t.response_ids)
                t.append(g.ids, True, g.log_probs, g.entropies)
                if g.stop_reason == "tool" and rounds_left[id(t)] > 0:
                    paused.append((t, start + (g.code_start or 0)))
                elif g.stop_reason == "tool":
                    t.stop_reason = "tool_rounds"
                else:
                    t.stop_reason = g.stop_reason
            if not paused:
                break
            codes = [last_code_block(self.tokenizer.decode(t.response_ids[cs:])) or "" for t, cs in paused]
            results = self.sandbox.run_batch(codes)
            still: list[Trajectory] = []
            for (t, code_start), code, res in zip(paused, codes, results):
                if self._should_correct(t, res, tries):
                    tries[id(t)] += 1
                    t.corrections += 1
                    t.truncate(max(self._min_keep(t), code_start - self.cfg.self_correction.backtrack_tokens))
                else:
                    tries[id(t)] = 0
                    self._append_output(t, code, code_start, res)
                    rounds_left[id(t)] -= 1
                if len(t.response_ids) >= self.cfg.max_total_tokens:
                    t.stop_reason = "length"
                else:
                    still.append(t)
            active = still

    def _should_correct(self, t: Trajectory, res, tries: dict) -> bool:
        sc = self.cfg.self_correction
        return sc.enabled and not res.passed and tries[id(t)] < sc.max_corrections

    @staticmethod
    def _min_keep(t: Trajectory) -> int:
        """Never backtrack into an earlier tool output: its tokens are the environment's."""
        return t.calls[-1].output_end if t.calls else 0

    def _append_output(self, t: Trajectory, code: str, code_start: int, res) -> None:
        feedback = res.feedback(self.cfg.max_tool_output_chars)
        code_end = len(t.response_ids)
        lead = "" if self.tokenizer.decode(t.response_ids[-1:]).endswith("\n") else "\n"
        ids = self._encode(f"{lead}{output_block(feedback)}\n")
        t.append(ids, False)
        t.calls.append(ToolCall(code=code, code_start=code_start, code_end=code_end, output_start=code_end,
                                output_end=len(t.response_ids), passed=res.passed, error=res.error, feedback=feedback))
