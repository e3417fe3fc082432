"""Audit Prompts: the subject, seed and prompts of one run of an audit over subjects × seeds (BiasMap §1).

Link its outputs to the sampler (seed, attribution prompt, demographic, semantic) and to CLIP Text Encode (the
prompt), set ``run``'s control after generate to "increment" (the frontend starts a new node on "randomize"), and
queue the graph with a batch count of the plan's runs (subjects × seeds; its ``plan`` output says how many): each
queued run takes the next subject and seed, and Audit Log gathers the rows into one file.
"""

from comfy_api.latest import io

from ..biasmap_engine import AUDIT_ORDERS, PAPER_PROFESSIONS, audit_run, check_plan
from .common import ADVANCED, CATEGORY, plain_errors

__all__ = ["BiasMapAuditPrompts"]

_RUNS, _SEEDS = (0, 10_000_000), (1, 100_000)  # the ranges of run and seeds


class BiasMapAuditPrompts(io.ComfyNode):
    """Subjects × seeds, one per queued run: the paper's protocol, in one node."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BiasMapAuditPrompts",
            display_name="BiasMap Audit Prompts",
            category=CATEGORY,
            description="One run of an audit over subjects (professions) × seeds: run 0, 1, 2, … (with its "
                        "control after generate on increment, the frontend counts the queued runs) picks the "
                        "subject and the seed, and gives the prompt, the attribution prompt (the prompt and the "
                        "demographic word, as the paper) and the concepts to link to the sampler. Queue the graph "
                        "with a batch count of the runs; for the paper's reductions, queue them again from run 0 with "
                        "the sampler at λ = 0, into the same audit file.",
            inputs=[
                io.Int.Input("run", default=0, min=_RUNS[0], max=_RUNS[1], control_after_generate=True,
                             tooltip="Which run of the audit this is: 0 for the first. Set its control after generate "
                                     "to increment (a new node starts on randomize): each queued prompt then takes "
                                     "the next."),
                io.String.Input("subjects", default="\n".join(PAPER_PROFESSIONS), multiline=True,
                                tooltip="The semantic concepts audited, one per line or comma-separated (default: "
                                        "the paper's 19 professions)."),
                io.String.Input("template", default="A photo of the face of a {}",
                                tooltip="The generation prompt, {} standing for the subject (the paper's)."),
                io.String.Input("demographic", default="gender",
                                tooltip="Demographic concept: the attribution prompt is the prompt, ' and ' and it "
                                        "(paper: gender, or race, each audited apart). Several, comma-separated, "
                                        "share one attribution prompt ('… and gender and race'): not the paper's, "
                                        "since every word's map depends on the prompt's other words."),
                io.Int.Input("seeds", default=100, min=_SEEDS[0], max=_SEEDS[1],
                             tooltip="Seeds per subject (the paper: 100)."),
                io.Int.Input("first_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, extra_dict=ADVANCED,
                             tooltip="The first seed; each subject gets first_seed … first_seed + seeds − 1."),
                io.Combo.Input("order", options=list(AUDIT_ORDERS), default=AUDIT_ORDERS[0], extra_dict=ADVANCED,
                               tooltip="seed by seed: every subject at one seed before the next seed, so an audit "
                                       "stopped early is balanced. subject by subject: all seeds of one subject "
                                       "first."),
            ],
            outputs=[io.String.Output("prompt", tooltip="The generation prompt: link it to CLIP Text Encode's text."),
                     io.String.Output("attribution_prompt", tooltip="Link it to the sampler's attribution_prompt."),
                     io.String.Output("demographic", tooltip="Link it to the sampler's demographic."),
                     io.String.Output("semantic", tooltip="This run's subject: link it to the sampler's semantic."),
                     io.Int.Output("seed", tooltip="This run's seed: link it to the sampler's seed."),
                     io.String.Output("plan", tooltip="Which run this is, of how many, with its subject and seed "
                                                      "(link Preview as Text to read it).")],
        )

    @classmethod
    def validate_inputs(cls, run=None, subjects=None, template=None, demographic=None, seeds=None):
        # Before the graph runs, so that a queue of an audit's runs stops at its first prompt. ComfyUI skips its own
        # range checks of the inputs named here (checked below), and shows the message under each of them; first_seed
        # and order are checked when the node runs, before the sampler it feeds.
        try:
            _check_ranges(run, seeds)
            # A linked input (None) is checked when the node runs, and so are those of the typed ones' checks it needs.
            check_plan(run=run, subjects=subjects, seeds=seeds, template=template, demographic=demographic)
        except ValueError as err:
            return str(err)
        return True

    @classmethod
    @plain_errors
    def execute(cls, run, subjects, template, demographic, seeds, first_seed, order) -> io.NodeOutput:
        _check_ranges(run, seeds)  # linked values too
        planned = audit_run(run, subjects, template, demographic, seeds, first_seed, order)
        return io.NodeOutput(planned.prompt, planned.attribution_prompt, planned.demographic, planned.subject,
                             planned.seed, planned.description)


def _check_ranges(run: int | None, seeds: int | None) -> None:
    """The inputs' ranges, which ComfyUI does not check for inputs validate_inputs names (a run below 0 is left to
    check_plan, whose message says where the audit begins)."""
    if run is not None and run > _RUNS[1]:
        raise ValueError(f"run {run} is past {_RUNS[1]:,}, the largest run: set run back to 0")
    if seeds is not None and not _SEEDS[0] <= seeds <= _SEEDS[1]:
        raise ValueError(f"seeds {seeds} is outside {_SEEDS[0]}–{_SEEDS[1]:,}: set it within")
