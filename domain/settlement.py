"""Settlement: the one place that decides a message's outcome, records it, tells the backend, and
settles the delivery on the queue.

The order is always the same: decide (a durable record, first writer wins across every worker),
tell the backend, remember that it was told, then ack. A copy of the message that arrives at any
point (a redelivery after a dropped connection, the same body published twice, another worker's
prefetch) finds the decision and follows it, so one message has one outcome whatever happens.
Nothing here waits for another delivery.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

from domain.backend_access import BackendAccess
from domain.errors import (
    FailureReport,
    GenerationError,
    NotifyError,
    StorageError,
    WebhookOutcomeUnknown,
    WebhookUnauthorized,
)
from domain.job import Completion
from domain.ledger import (
    TOLD_DELIVERED,
    TOLD_PARKED,
    TOLD_UNKNOWN,
    TOLD_WITHHELD,
    Decision,
    Entry,
    MessageId,
    OutcomeLedger,
    Verdict,
)
from domain.settlement_policy import MAX_ERROR_MESSAGE, Settled, SettlementPolicy
from ports.notifier import Notifier
from ports.task_source import Delivery, TaskSource
from ports.telemetry import NoTelemetry, Telemetry

log = logging.getLogger(__name__)


class Settlement:  # pylint: disable=too-many-instance-attributes
    """Decides, records and tells each message's outcome, then settles its delivery.

    Methods return how the delivery was settled and never raise for trouble with storage, the
    backend or the queue: those hand the message back (or park it) instead.
    """

    def __init__(
        self,
        *,
        source: TaskSource,
        ledger: OutcomeLedger,
        notifier: Notifier,
        access: BackendAccess,
        policy: SettlementPolicy | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._source = source
        self._ledger = ledger
        self._notifier = notifier
        self._access = access
        self.policy = policy if policy is not None else SettlementPolicy()
        self._telemetry = telemetry if telemetry is not None else NoTelemetry()

    # --- before a job runs -------------------------------------------------------------------

    def backend_refusal(self) -> str | None:
        """Why the backend refuses the worker's credentials, or None when it takes them.

        While refused, the backend is asked again at most every ``probe_seconds``.
        """
        refusal = self._access.refusal
        if refusal is None or not self._access.probe_due():
            return refusal
        try:
            self._notifier.check_access()
        except WebhookUnauthorized as exc:
            self._access.refused(exc.message)
            return exc.message
        except NotifyError as exc:
            log.info("cannot ask the backend about the credentials now: %s", exc)
            return refusal
        self._access.accepted()
        return None

    def known(
        self,
        delivery: Delivery,
        message: MessageId,
        stored: Callable[[], Completion | None],
    ) -> Settled | None:
        """Settle a delivery whose outcome is known already; None when its job must run.

        Known: a decision recorded for this very message (told: acked silently; not told: told
        now), or an image stored for its generation (a completion is decided and told; the image
        is never rendered again).
        """
        try:
            entry = self._ledger.entry(message)
            if entry is None:
                completion = stored()
                if completion is None:
                    return None
                log.info("generation %s: its image is stored; reporting it", message.generation_id)
                return self._decide(delivery, message, self._completion(message, completion))
        except StorageError as exc:
            return self._hand_back(delivery, f"outcome records unreachable: {exc}")
        return self._tell(delivery, message, entry, _copy_token(), retell=False)

    def carried(self, delivery: Delivery, message: MessageId, report: FailureReport) -> Settled:
        """A failure an earlier worker version decided and carried in the message's headers."""
        return self._decide(delivery, message, self._failure(message, report))

    # --- the end of a job --------------------------------------------------------------------

    def completed(self, delivery: Delivery, message: MessageId, completion: Completion) -> Settled:
        """The image is stored: decide the completion (unless decided) and tell it."""
        return self._decide(delivery, message, self._completion(message, completion), retell=True)

    def failed(self, delivery: Delivery, message: MessageId, error: GenerationError) -> Settled:
        """The job ended in ``error``: hand it back while retries remain, else decide the
        failure (unless an outcome was decided) and tell it."""
        if error.retryable and delivery.attempt < self.policy.max_retries:
            try:
                entry = self._ledger.entry(message)
            except StorageError:
                entry = None  # handed back all the same; the next delivery reads it again
            if entry is not None:
                # Another copy decided meanwhile: follow it (a completion is told again, since
                # this copy's progress calls may have replaced the metadata it stored).
                return self._tell(delivery, message, entry, _copy_token(), retell=True)
            log.warning(
                "generation %s: %s (attempt %d), handing back for retry",
                message.generation_id,
                error,
                delivery.attempt,
            )
            return self._hand_back(delivery, str(error), attempt=delivery.attempt + 1)
        log.error("generation %s failed: %s", message.generation_id, error)
        report = FailureReport(
            generation_id=message.generation_id,
            code=error.code,
            message=error.message[:MAX_ERROR_MESSAGE],
            retry_count=delivery.attempt,
        )
        return self._decide(delivery, message, self._failure(message, report), retell=True)

    def poison(
        self, delivery: Delivery, message: MessageId | None, error: GenerationError
    ) -> Settled:
        """A message that can never run: parked, and reported failed when it names a generation."""
        log.warning(
            "poison message (generation %s): %s", getattr(message, "generation_id", None), error
        )
        if message is None:
            return self._park(delivery, str(error))
        report = FailureReport(
            generation_id=message.generation_id,
            code=error.code,
            message=error.message[:MAX_ERROR_MESSAGE],
            retry_count=delivery.attempt,
            poison=True,
        )
        return self._decide(delivery, message, self._failure(message, report))

    # --- without a job -----------------------------------------------------------------------

    def returned(self, delivery: Delivery, reason: str, *, requeue_now: bool = False) -> Settled:
        """Give a delivery back unstarted: now (``requeue_now``), or after a back-off."""
        log.info("delivery handed back unstarted: %s", reason)
        if requeue_now:
            self._guard(lambda: self._source.release(delivery))
            return Settled.RETURNED
        self._hand_back(delivery, reason)
        return Settled.RETURNED

    def contain(self, delivery: Delivery, error: GenerationError) -> Settled:
        """The last resort when settling itself failed: no webhook, no record; hand the message
        back while retries remain, then park it, so no message loops forever."""
        log.error("delivery could not be settled: %s", error)
        if delivery.attempt >= self.policy.max_retries:
            return self._park(delivery, f"could not be settled: {error}")
        return self._hand_back(
            delivery, f"could not be settled: {error}", attempt=delivery.attempt + 1
        )

    # --- deciding and telling ----------------------------------------------------------------

    def _completion(self, message: MessageId, completion: Completion) -> Decision:
        return Decision(
            verdict=Verdict.COMPLETED,
            generation_id=message.generation_id,
            task_id=message.task_id,
            decided_at=self._ledger.now(),
            result_url=completion.result_url,
            metadata=completion.metadata,
        )

    def _failure(self, message: MessageId, report: FailureReport) -> Decision:
        return Decision(
            verdict=Verdict.FAILED,
            generation_id=report.generation_id,
            task_id=message.task_id,
            decided_at=self._ledger.now(),
            failure=report,
        )

    def _decide(
        self, delivery: Delivery, message: MessageId, decision: Decision, *, retell: bool = False
    ) -> Settled:
        """Record ``decision`` (or find the one recorded first) and tell the one that stands.

        ``retell``: this copy ran the job, so its progress calls may have replaced the metadata
        the backend stored; a completion is then told again even if a copy told it already (the
        completion merges the metadata back; the backend takes it again harmlessly).
        """
        copy = _copy_token()
        try:
            entry = self._ledger.decide(message, decision, teller=copy)
        except StorageError as exc:
            return self._hand_back(delivery, f"outcome not recorded: {exc}")
        if entry.decision is not decision:
            log.info(
                "generation %s: a copy decided %s first; following it",
                message.generation_id,
                entry.decision.verdict.value,
            )
        return self._tell(delivery, message, entry, copy, retell=retell)

    def _tell(
        self, delivery: Delivery, message: MessageId, entry: Entry, copy: str, *, retell: bool
    ) -> Settled:
        """Tell the backend the entry's outcome, unless it was told (or is being told)."""
        decision = entry.decision
        if entry.told is not None and entry.told.startswith(TOLD_UNKNOWN):
            # The backend may have it: every copy goes to the operator, none is sent.
            return self._undelivered(delivery, decision, WebhookOutcomeUnknown(entry.told))
        if entry.settled and not (retell and decision.verdict is Verdict.COMPLETED):
            log.info(
                "generation %s: a copy of a message already told (%s); acked",
                message.generation_id,
                decision.verdict.value,
            )
            return self._settle(delivery, Settled.DUPLICATE)
        try:
            if decision.verdict is Verdict.COMPLETED:
                return self._tell_completion(delivery, message, entry)
            return self._tell_failure(delivery, message, entry, copy)
        except StorageError as exc:
            return self._hand_back(delivery, f"outcome records unreachable: {exc}")

    def _tell_completion(self, delivery: Delivery, message: MessageId, entry: Entry) -> Settled:
        """Completions may be told by any copy, any number of times: the backend sets the same
        status and URL again."""
        decision = entry.decision
        try:
            self._notifier.completed(
                decision.generation_id, decision.result_url or "", decision.metadata
            )
        except NotifyError as exc:
            if entry.told is not None:
                # A re-telling failed: the next copy must tell it again, not ack it as told.
                self._forget_told(message, entry)
            return self._undelivered(delivery, decision, exc)
        self._access.accepted()
        self._mark_told(message, entry, TOLD_DELIVERED)
        return self._settle(delivery, Settled.COMPLETED)

    def _tell_failure(
        self, delivery: Delivery, message: MessageId, entry: Entry, copy: str
    ) -> Settled:
        """A failure is told by one copy at a time, and once per generation: the backend
        refunds the user on every failure call."""
        report = entry.decision.failure
        turn = self._turn(message, entry, copy) if report is not None else None
        if turn is _MAYBE_SENT:
            # Its teller marked it sending, then stopped: the backend may have it. Never blind.
            error = WebhookOutcomeUnknown("the copy telling this failure stopped while sending it")
            self._mark_told(message, entry, f"{TOLD_UNKNOWN}{error.message}")
            return self._undelivered(delivery, entry.decision, error)
        if report is None or not isinstance(turn, Entry):
            return self._hand_back(delivery, "another copy is telling its failure")
        if not self._owns_failure(message):
            log.warning(
                "generation %s: already reported failed by another message; this failure"
                " (%s) is recorded, not sent (the backend refunds on every failure call)",
                message.generation_id,
                report.code.value,
            )
            self._telemetry.failure_withheld()
            self._mark_told(message, turn, TOLD_WITHHELD)
            return self._settle_failure(delivery, report)
        sending = self._mark_sending(message, turn)
        if sending is None:
            return self._hand_back(delivery, "another copy took the turn to tell its failure")
        return self._send_failure(delivery, message, sending, report)

    def _send_failure(
        self, delivery: Delivery, message: MessageId, sending: Entry, report: FailureReport
    ) -> Settled:
        """The one failure call, by the copy holding the turn, marked as being sent."""
        try:
            self._notifier.failed(
                report.generation_id, report.code, report.message, report.retry_count
            )
        except WebhookOutcomeUnknown as exc:
            # Perhaps applied: no copy may send it again; an operator checks and replays.
            self._mark_told(message, sending, f"{TOLD_UNKNOWN}{exc.message}")
            return self._undelivered(delivery, sending.decision, exc)
        except NotifyError as exc:
            # Surely not applied: another copy may tell it (or, given up, another message).
            _, give_up = self.policy.verdict(self._ledger.now() - sending.decision.decided_at, exc)
            if give_up:
                self._mark_told(message, sending, f"{TOLD_PARKED}{exc.message}")
            else:
                self._release_turn(message, sending)
            return self._undelivered(delivery, sending.decision, exc)
        self._access.accepted()
        self._mark_told(message, sending, TOLD_DELIVERED)
        return self._settle_failure(delivery, report)

    def _settle_failure(self, delivery: Delivery, report: FailureReport) -> Settled:
        """Ack a told failure, or park it when the message was poison."""
        if report.poison:
            return self._park(delivery, f"{report.code.value}: {report.message}")
        return self._settle(delivery, Settled.FAILED)

    def _turn(self, message: MessageId, entry: Entry, copy: str) -> Entry | object | None:
        """The entry with this copy holding the turn to tell; None while another copy holds it
        (a live teller finishes well within its lease) or took it first; ``_MAYBE_SENT`` when
        the teller's lease ran out after it marked the outcome as being sent."""
        if entry.teller == copy:
            return entry
        held = self._ledger.now() - entry.teller_since < self.policy.telling_lease_seconds
        if entry.teller is not None and held:
            return None
        if entry.teller is not None and entry.sending:
            return _MAYBE_SENT
        return self._ledger.take_turn(message, entry, copy)

    def _undelivered(self, delivery: Delivery, decision: Decision, exc: NotifyError) -> Settled:
        """The backend did not take a decided outcome: hand the message back, or give up."""
        age = self._ledger.now() - decision.decided_at
        reason, give_up = self.policy.verdict(age, exc)
        if isinstance(exc, WebhookUnauthorized):
            self._access.refused(exc.message)
        verdict = decision.verdict.value
        self._telemetry.outcome_undelivered(outcome=verdict, reason=reason, parked=give_up)
        if give_up:
            log.error(
                "generation %s: the backend did not take the %s (%s) after %.0f s; parked"
                " with the outcome for an operator",
                decision.generation_id,
                verdict,
                exc,
                age,
            )
            return self._park(delivery, f"{verdict} not delivered: {exc}", decision)
        log.warning(
            "generation %s: %s not delivered (%s); handed back",
            decision.generation_id,
            verdict,
            exc,
        )
        return self._hand_back(delivery, f"{verdict} not delivered: {exc}")

    def _mark_told(self, message: MessageId, entry: Entry, how: str) -> None:
        """Record the telling; the outcome reached the backend, so nothing may escape from here
        into a path that would tell it again (a failure left "sending" is never resent)."""
        try:
            self._ledger.mark_told(message, entry, how)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            log.warning("generation %s: told, but not recorded: %s", message.generation_id, exc)

    def _owns_failure(self, message: MessageId) -> bool:
        """Whether this message may send its generation's one failure call: it claimed it, or
        the message that had claimed it gave its failure up undelivered."""
        owner = self._ledger.failure_owner(message)
        return owner == message.key or self._ledger.take_failure(message, owner)

    def _mark_sending(self, message: MessageId, turn: Entry) -> Entry | None:
        """Mark the failure as being sent; None when another copy changed the record. A write
        whose answer was lost (the retry then finds its own change) counts as made."""
        try:
            sending = self._ledger.mark_sending(message, turn)
        except StorageError:
            sending = None
        if sending is not None:
            return sending
        current = self._ledger.entry(message)
        landed = current is not None and current.teller == turn.teller and current.sending
        return current if landed and current is not None and not current.settled else None

    def _forget_told(self, message: MessageId, entry: Entry) -> None:
        try:
            self._ledger.forget_told(message, entry)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            log.warning(
                "generation %s: completion not marked untold: %s", message.generation_id, exc
            )

    def _release_turn(self, message: MessageId, entry: Entry) -> None:
        try:
            self._ledger.release_turn(message, entry)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            # Another copy takes the turn once the lease runs out.
            log.warning("generation %s: turn not released: %s", message.generation_id, exc)

    # --- the queue ---------------------------------------------------------------------------

    def _settle(self, delivery: Delivery, settled: Settled) -> Settled:
        """Ack the delivery, settled as ``settled``."""
        self._guard(lambda: self._source.ack(delivery))
        return settled

    def _hand_back(self, delivery: Delivery, reason: str, *, attempt: int | None = None) -> Settled:
        delay = self.policy.delay(delivery.handbacks)
        kept = delivery.attempt if attempt is None else attempt
        self._guard(
            lambda: self._source.retry(delivery, reason=reason, attempt=kept, delay_seconds=delay)
        )
        return Settled.RETRY

    def _park(self, delivery: Delivery, reason: str, decision: Decision | None = None) -> Settled:
        outcome = decision.as_payload() if decision is not None else None
        self._guard(lambda: self._source.park(delivery, reason, outcome=outcome))
        return Settled.PARKED

    @staticmethod
    def _guard(settle: Callable[[], None]) -> None:
        """A source must not raise while settling; if one does, the broker redelivers."""
        try:
            settle()
        except Exception:  # pylint: disable=broad-exception-caught
            log.exception("the queue could not settle a delivery; it will be delivered again")


_MAYBE_SENT = object()
"""``_turn``'s answer when a failure may have reached the backend from a copy that stopped."""


def _copy_token() -> str:
    """A name for this copy's turn at telling an outcome, unique across workers."""
    return uuid.uuid4().hex
