"""The coordinator over real HTTP: the token is required, /status reports membership."""

import socket
import threading

import httpx
import pytest

import shoal.coordinator.client as client_module
from shoal.coordinator import Coordinator, CoordinatorClient, Membership
from shoal.coordinator.client import CoordinatorUnreachable


@pytest.fixture
def coordinator():
    server = Coordinator(Membership(expected_workers=2, min_workers=1), token="secret").start()
    yield server
    server.stop()


def test_requests_without_the_token_are_refused(coordinator):
    assert httpx.get(f"{coordinator.url}/status").status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    response = httpx.post(f"{coordinator.url}/join", json={"worker_id": 0}, headers=wrong)
    assert response.status_code == 401
    assert coordinator.membership.snapshot()["workers"] == {}  # nothing changed


def test_a_restart_of_a_finished_worker_is_offered_no_generation_only_the_end(coordinator):
    """Worker 0 finished its part, died, and its restart joined under its id: a generation
    (even the current one, which it is in) would have it meet members that are done, so it
    is told nothing until the job ends, and then that it completed."""
    membership = coordinator.membership
    client = CoordinatorClient(coordinator.url, "secret")
    try:
        for worker in (0, 1):
            client.post("/join", {"worker_id": worker, "host": "a", "pid": 10 + worker})
        membership.finish(0, {"generation": 1})
        membership.report_exit(0, "killed by SIGKILL")
        client.post("/join", {"worker_id": 0, "host": "a", "pid": 20})
        assert client.get("/generation", after=0, timeout=0.2)["generation"]["members"] == [0, 1]
        assert client.get("/generation", after=0, timeout=0.2, worker=0)["generation"] is None
        membership.finish(1, {"generation": 1})
        assert client.get("/generation", after=0, timeout=5, worker=0)["status"] == "completed"
    finally:
        client.close()


def test_join_forms_a_generation_and_status_reports_it(coordinator):
    client = CoordinatorClient(coordinator.url, "secret")
    try:
        first = client.post("/join", {"worker_id": 0, "host": "a", "pid": 1})
        assert first["store_port"] == coordinator.store.port
        assert client.get("/generation", after=0, timeout=0.2)["generation"] is None
        client.post("/join", {"worker_id": 1, "host": "b", "pid": 2})
        generation = client.get("/generation", after=0, timeout=5)["generation"]
        assert generation["members"] == [0, 1]
        status = client.get("/status")
        assert status["generation"] == 1 and status["members"] == [0, 1]
        assert set(status["workers"]) == {"0", "1"}
        assert all(w["heartbeat_age"] >= 0 for w in status["workers"].values())
    finally:
        client.close()


def test_a_second_live_worker_with_the_same_id_is_refused(coordinator):
    client = CoordinatorClient(coordinator.url, "secret")
    try:
        client.post("/join", {"worker_id": 0, "host": "a", "pid": 1})
        with pytest.raises(httpx.HTTPStatusError):
            client.post("/join", {"worker_id": 0, "host": "a", "pid": 2})
    finally:
        client.close()


class _HangUp:
    """A port that accepts each connection and closes it at once, counting them. (Its thread
    must end with the test: later tests fork, which needs a process without threads.)"""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.accepted = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._serve)
        self._thread.start()

    def _serve(self):
        while not self._done.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            connection.close()

    def close(self):
        self._done.set()
        self._thread.join()
        self.listener.close()


def test_a_heartbeat_tries_once_and_leaves_retrying_to_the_next_beat():
    """Each beat is one try: a beat that retried carried an old payload, and waited out its
    backoff while the coordinator was already back (members then reached a restarted
    coordinator up to a second apart). The training loop's client does retry."""
    hang_up = _HangUp()
    heartbeat = CoordinatorClient.for_heartbeats(hang_up.url, "secret", heartbeat_timeout=2.0)
    retrying = CoordinatorClient(hang_up.url, "secret", retry_seconds=0.5)
    try:
        with pytest.raises(CoordinatorUnreachable):
            heartbeat.post("/heartbeat", {"worker_id": 0})
        assert hang_up.accepted == 1
        with pytest.raises(CoordinatorUnreachable):
            retrying.post("/heartbeat", {"worker_id": 0})
        assert hang_up.accepted > 2
    finally:
        heartbeat.close()
        retrying.close()
        hang_up.close()


def test_a_finished_workers_wait_is_answered_by_the_end_or_by_another_incarnation(coordinator):
    """``end_only``: a new generation does not answer it, the job's end does, and so does a
    coordinator that is not the one the worker told its finish (it must tell it again)."""
    client, waiter = (CoordinatorClient(coordinator.url, "secret") for _ in range(2))
    membership = coordinator.membership
    mine = {"end_only": 1, "incarnation": membership.incarnation}
    try:
        for worker in (0, 1):
            client.post("/join", {"worker_id": worker, "host": "a", "pid": worker})
        other = client.get("/generation", end_only=1, incarnation="a restarted one's", timeout=30)
        assert other["incarnation"] == membership.incarnation and other["status"] == "running"
        assert client.get("/generation", **mine, timeout=0.2)["generation"] is None  # gen 1 exists
        client.post("/finish", {"worker_id": 0})
        ended = {}
        waiting = threading.Thread(target=lambda: ended.update(waiter.get("/generation", **mine, timeout=30)))
        waiting.start()
        client.post("/finish", {"worker_id": 1})
        waiting.join(timeout=30)
        assert ended["status"] == "completed"
    finally:
        client.close()
        waiter.close()


def test_a_client_that_hangs_up_mid_request_changes_nothing_and_logs_no_traceback(coordinator, caplog):
    """A worker killed while it sends a report: the coordinator reads half a body. Nobody is
    left to answer; a traceback in the launcher's output would only alarm its user."""
    body = b'{"worker_id": 0, "kind": "kill", "detail": "--kill 0@5: SIGKILL"}'
    port = int(coordinator.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(b"POST /report HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer secret\r\n"
                           b"Content-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n" % len(body) + body[:20])
    client = CoordinatorClient(coordinator.url, "secret")
    try:
        client.get("/status")  # served after the hang-up was handled
    finally:
        client.close()
    assert not [record for record in caplog.records if record.exc_info], caplog.text
    assert coordinator.membership.snapshot()["workers"] == {}


@pytest.mark.parametrize("restarting", [True, False])
def test_an_exit_reported_by_id_as_restarting_holds_the_job_for_the_worker(restarting):
    """`shoal run --nnodes --max-restarts`: another node's launcher reports its worker's exit by
    id, saying it starts the worker again. A job the exit leaves below --min-workers then
    waits for it; without the restart it fails at once (a membership built without restarts
    gives no grace for an announcement)."""
    membership = Membership(expected_workers=2, min_workers=2)
    server = Coordinator(membership, token="secret").start()
    client = CoordinatorClient(server.url, "secret")
    try:
        for worker in (0, 1):
            client.post("/join", {"worker_id": worker, "host": "a", "pid": 10 + worker})
        client.post("/report", {"kind": "exit", "worker_id": 1, "detail": "killed by SIGKILL",
                                "restarting": restarting})
        assert membership.status == ("running" if restarting else "failed")
        if restarting:
            client.post("/join", {"worker_id": 1, "host": "a", "pid": 21})
            generation = client.get("/generation", after=1, timeout=5)["generation"]
            assert generation["members"] == [0, 1]
    finally:
        client.close()
        server.stop()


def test_a_client_given_a_successor_goes_to_it_when_the_first_cannot_be_reached(coordinator):
    """A worker under ``shoal run --nnodes`` knows node 0's coordinator and node 1's standby.
    Node 0 gone, a request goes on to the next; every client of the process asks that one from
    then on; and while a standby waits (its port bound, not listening) a try there is refused at
    once, not left hanging."""
    from shoal.launch.succession import Standby

    gone, standby = Standby("127.0.0.1", socket.AF_INET), Standby("127.0.0.1", socket.AF_INET)
    heartbeat = CoordinatorClient.for_heartbeats(f"{gone.url},{coordinator.url}", "secret", heartbeat_timeout=5.0)
    retrying = CoordinatorClient(f"{gone.url.upper()},{coordinator.url}", "secret", retry_seconds=5.0)
    back = CoordinatorClient(f"{coordinator.url},{standby.url}", "secret", retry_seconds=0.0)
    try:
        with pytest.raises(CoordinatorUnreachable):  # one try per beat: refused, no wait
            heartbeat.post("/join", {"worker_id": 0, "host": "a", "pid": 1})
        assert heartbeat.url == coordinator.url  # the next beat goes there
        later = CoordinatorClient(f"{gone.url},{coordinator.url}", "secret", retry_seconds=0.0)
        assert later.url == coordinator.url  # and so does any client made since
        later.close()
        assert retrying.post("/join", {"worker_id": 0, "host": "a", "pid": 1})["worker_id"] == 0
        assert retrying.url == coordinator.url  # went on (an upper-case name is a name too)
        assert back.get("/status")["workers"]  # the first answers: the standby is never asked
        assert back.url == coordinator.url
    finally:
        for client in (heartbeat, retrying, back):
            client.close()
        gone.close()
        standby.close()


def test_a_process_served_by_the_successor_never_goes_back_to_the_first(coordinator):
    """Node 1 took over and answered: a try there that fails (a slow answer, say) is tried
    there again, not at node 0, which, cut off and back, would answer for a job it no longer
    holds (evicted, or failed) and stop a worker of the one that went on."""
    from shoal.launch.succession import Standby

    node_0 = Standby("127.0.0.1", socket.AF_INET)  # refuses: as if gone
    client = CoordinatorClient(f"{node_0.url},{coordinator.url}", "secret", retry_seconds=0.0)
    try:
        with pytest.raises(CoordinatorUnreachable):
            client.get("/status")
        assert client.get("/status")["workers"] == {}  # the successor answers
        node_0.take_over("secret", Membership(expected_workers=1, min_workers=1))  # node 0 is back
        coordinator.stop()  # and a try at the successor fails
        for _ in range(2):
            with pytest.raises(CoordinatorUnreachable):
                client.get("/status")
            assert client.url == coordinator.url
    finally:
        client.close()
        node_0.close()


def test_a_request_left_unanswered_goes_on_to_the_successor(coordinator, monkeypatch):
    """Node 0 cut off (or frozen) refuses nothing: a request on it waits for an answer that
    never comes. With a successor listed each try is bounded, and the next one is asked."""
    monkeypatch.setattr(client_module, "_FAILOVER_ANSWER_SECONDS", 0.5)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel takes the connection; nobody ever answers on it
        client = CoordinatorClient(f"http://127.0.0.1:{silent.getsockname()[1]},{coordinator.url}", "secret")
        try:
            assert client.post("/join", {"worker_id": 0, "host": "a", "pid": 1})["worker_id"] == 0
            assert client.url == coordinator.url
        finally:
            client.close()
