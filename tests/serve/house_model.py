"""A scripted model under a name keel's price table does not know (a house or new model)."""

from keel.evals import ScriptedChatModel

model = ScriptedChatModel(
    script=["Done."],
    model_name="house-model",
    structured={"Plan": {"steps": ["answer"]}, "JudgeVerdict": {"passed": True, "reason": "ok"}},
)
