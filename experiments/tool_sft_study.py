"""Study: TL-Training's key-token weights (PKT, arXiv 2412.15495) against plain SFT on tool calls, over seeds.

    python -m launch.study --study=tool_sft_study --seeds=3
    python -m launch.study --study=tool_sft_study:smoke --seeds=1

Two rows of `tool_sft` on the same 256 training requests and the same 256 held-out ones: `uniform`
(every token weighs 1: plain SFT) and `pkt` (`data.tool_weights=pkt`: the key tokens of the tool's name
weigh min((N − K)/K, 9)), everything else equal (model, steps, batch, learning rate, seed). Each seed's
`pkt` run is paired with its `uniform` run. Metrics: the greedy held-out tool_name_accuracy (the paper's
claim is about choosing the right tool; an output that does not parse is wrong), the same read from the
output's first `"name": "..."` whether or not it parses (`tool_name_accuracy_lenient`: the choice of tool
apart from the call's form), call_exact_match and json_valid, and the held-out unweighted NLL per token.
"""

from experiments import Method, Study

METRICS = (
    "tool_name_accuracy",
    "tool_name_accuracy_lenient",
    "call_exact_match",
    "json_valid",
    "eval_nll_per_token",
)


def get_study(arg=None):
    experiment = "tool_sft" + (":smoke" if arg == "smoke" else "")
    return Study(
        name="tool_sft_study",
        methods=(
            Method("uniform", experiment, {"data.tool_weights": "uniform"}),
            Method("pkt", experiment, {"data.tool_weights": "pkt"}),
        ),
        metrics=METRICS,
        note="PKT (key-token weighted SFT, arXiv 2412.15495) vs plain SFT on the embedded tool task: greedy "
        "held-out tool-name accuracy, paired over seeds with the uniform row.",
        baseline="uniform",
    )
