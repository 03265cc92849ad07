"""The commands' plain-text output: a certificate's table and a certified answer's summary."""

from __future__ import annotations

from fsmllm.api.schemas import CertificateOut
from fsmllm.certify import Certificate
from fsmllm.certify.answers import AnswerCertificate

#: what the table says when ``abstain`` is true: its one meaning (docs/method.md, step 4)
ABSTAIN_NOTE = "nothing certified at any requested radius"


def _number(value: float | None) -> str:
    """A bound in a table cell; ``none``: nothing certified there (the JSON's null)."""
    return "none" if value is None else f"{value:.4f}"


def certificate_table(cert: Certificate, out: CertificateOut, per_token: bool = False) -> str:
    """The certificate as ``fsmllm certify`` prints it: the settings, then a row per radius, then what each
    column means."""
    cfg = cert.config
    lines = [
        f"encoder {out.encoder}  booster {out.booster}  input 3x{out.input_size}x{out.input_size} pixels in [0, 1]",
        f"sigma {cfg.sigma}  n0 {cfg.n0}  n {cert.n}"
        + ("" if cert.stopped_by == "budget" else f" of {cfg.n} ({cert.stopped_by})")
        + f"  alpha {cfg.alpha}  bound {cfg.bound}  seed {cert.seed}",
        f"score S: estimate {cert.score_estimate:.4f}, certified lower bound {cert.score_lower:.4f}"
        + (f"  -> ABSTAIN ({ABSTAIN_NOTE})" if out.abstain else ""),
        "",
        f"{'radius':>8}  {'certified FCSB':>14}  {'served FCSB':>12}  {'estimated FCSB':>14}",
    ]
    for radius, certified, served, estimated in zip(
        cert.radii, cert.certified_fcsb, cert.served_fcsb, cert.estimated_fcsb
    ):
        lines.append(f"{radius:>8.4f}  {_number(certified):>14}  {_number(served):>12}  {estimated:>14.4f}")
    lines.append("")
    lines.append(
        f"certified FCSB: with probability >= {1 - cfg.alpha:g}, cos(F(x), F(x')) >= this for every "
        "||x'-x||_2 <= radius"
        " (F: the smoothed encoder)"
    )
    lines.append("served FCSB: the same for the features handed to the language model (the mean of the samples)")
    lines.append("estimated FCSB: the paper's formula at the estimated score (an estimate, not a certificate)")
    if out.certified_radius is not None:
        target = out.certified_radius
        lines.append(f"largest radius with certified FCSB >= {target.target_cos}: {_number(target.radius)}")
    if cert.worst_token is not None:
        lines.append(
            f"granularity token: every token certified on its own; the numbers above are token {cert.worst_token}'s"
            " (the worst)"
        )
    if per_token and cert.tokens is not None:
        lines.append(
            f"{'token':>6}  {'score lower':>11}  " + "  ".join(f"{'ε=' + format(r, 'g'):>8}" for r in cert.radii)
        )
        for t, (lower, row) in enumerate(zip(cert.tokens.score_lower, cert.token_certified_fcsb())):
            lines.append(f"{t:>6}  {lower:>11.4f}  " + "  ".join(f"{_number(v):>8}" for v in row))
    if cert.prediction is not None:
        p = cert.prediction
        verdict = "abstain" if p.radius is None else f"certified up to radius {p.radius:.4f}"
        lines.append(f"prediction: {p.label} ({verdict}; runner-up bound {p.runner_up_upper:.4f})")
    return "\n".join(lines)


def answer_summary(voted: AnswerCertificate) -> str:
    """A certified answer as ``fsmllm generate --certify-answer`` prints it: the answer, its radius, the bound."""
    cfg = voted.config
    radius = "abstain (p_lower <= 1/2)" if voted.radius is None else f"{voted.radius:.4f} (l2)"
    votes = ", ".join(f"{text!r} x{count}" for text, _, count in voted.votes)
    return (
        f"certified answer: {voted.answer!r}\n"
        f"  radius:   {radius}\n"
        f"  p_lower:  {voted.p_lower:.4f} ({cfg.bound}, alpha {cfg.alpha:g}, {voted.agree}/{voted.n} votes agree,"
        f" n0 {cfg.n0}, stopped by {voted.stopped_by}, seed {voted.seed})\n"
        f"  votes:    {votes}"
    )
