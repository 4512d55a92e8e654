"""A scripted model under a name keel's price table does not know (a house or new model)."""

from keel.evals import ScriptedChatModel

model = ScriptedChatModel(
    script=["Done."],
    model_name="house-model",
    structured={"Plan": {"steps": ["answer"]}, "JudgeVerdict": {"passed": True, "reason": "ok"}},
)


def demo() -> ScriptedChatModel:
    """keel's demo scenario (`keel:demo`) played under the house model's name."""
    from keel.evals.demo import demo_model

    played = demo_model()
    assert isinstance(played, ScriptedChatModel)
    played.model_name = "house-model"
    return played
