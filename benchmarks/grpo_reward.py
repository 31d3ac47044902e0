"""The recipe's reward function (`--reward benchmarks/grpo_reward.py:digits`): exact-match
credit plus partial credit for each right digit, so that a model that gets few sums exactly
right still sees which of its replies are closer. A user reward function like any other:
`fn(prompt, reply, answer) -> number`."""


def digits(prompt: str, reply: str, answer: str) -> float:
    """1.0 for the exact answer; else half the share of the answer's digits that the reply has
    at the same place counted from the right (units under units), 0 for a reply that is not
    a bare number."""
    reply, answer = reply.strip(), answer.strip()
    if reply == answer:
        return 1.0
    if not reply.isdigit():
        return 0.0
    hits = sum(a == b for a, b in zip(reversed(reply), reversed(answer)))
    return 0.5 * hits / max(len(answer), len(reply))
