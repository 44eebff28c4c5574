"""The demo's simulated operator: it judges answers by the eval's criterion (form and content) and,
for a customer it never corrects, sends a rubric score as the reward."""

from __future__ import annotations

import asyncio

from clora.agents.preference import PreferenceEnv
from clora.demo.simulation import Exchange, SimulatedOperator

QUESTION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a volcano?"}]


def review(answer: str, spec: str, corrects: bool = True):
    async def reference(messages) -> str:
        return "A volcano is a mountain that erupts lava. It can be dangerous."

    async def run():
        operator = SimulatedOperator("http://127.0.0.1:9", "key", reference)
        try:
            return await operator.review(Exchange("c", QUESTION, answer, "trace-1", "stop"), PreferenceEnv(spec),
                                         corrects)
        finally:
            await operator.close()
    return asyncio.run(run())


def test_a_good_answer_gets_a_thumbs_up_and_nothing_else():
    event = review("- A volcano is a mountain\n- It erupts lava", "bullets")
    assert event.rating == "up" and event.correction is None and event.reward is None


def test_an_answer_in_form_but_off_the_question_is_corrected_not_approved():
    event = review("- It is big\n- It is tall", "bullets")  # a list, but it never says what it is about
    assert event.rating == "down"
    assert event.correction["content"] == "- A volcano is a mountain that erupts lava\n- It can be dangerous"


def test_an_operator_who_never_corrects_sends_the_rubric_score_as_reward_on_the_feedback_scale():
    good = review("A volcano is a mountain that erupts lava.", "one-sentence", corrects=False)
    close = review("A volcano is a mountain that erupts lava and", "one-sentence", corrects=False)
    far = review("A volcano is a mountain. It erupts lava. It is hot.", "one-sentence", corrects=False)
    off = review("It is a mountain that erupts lava.", "one-sentence", corrects=False)
    # -1..1 with 0 neutral, as ratings (+1/-1): answers further from the rule than halfway count against.
    assert good.reward == 1.0 and 0 == close.reward and -1 < far.reward < 0 and off.reward == -1.0
    for event in (good, close, far, off):
        assert event.rating is None and event.correction is None and event.kind() == "reward"


def test_a_batch_is_resent_with_the_same_event_ids_after_a_dropped_connection():
    """A server that closes the first connection without answering (as a keep-alive race does),
    then accepts: the operator sends again, with the ids it gave the events, so they apply once."""
    import json

    from clora.wire.feedback import FeedbackEvent

    bodies: list[dict] = []

    async def run():
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            body = json.loads(await reader.readexactly(length))
            bodies.append(body)
            if len(bodies) > 1:
                payload = json.dumps({"event_ids": [e["event_id"] for e in body["events"]]}).encode()
                writer.write(b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: "
                             + str(len(payload)).encode() + b"\r\n\r\n" + payload)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        operator = SimulatedOperator(f"http://127.0.0.1:{port}", "key")
        try:
            return await operator.send([FeedbackEvent(trace_id="t1", rating="up"),
                                        FeedbackEvent(trace_id="t2", reward=-0.5)])
        finally:
            await operator.close()
            server.close()

    accepted = asyncio.run(run())
    assert len(bodies) == 2 and bodies[0] == bodies[1]  # the same batch, ids and all
    ids = [e["event_id"] for e in bodies[0]["events"]]
    assert accepted == ids and len(set(ids)) == 2 and all(ids)
