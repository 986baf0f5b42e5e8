#!/usr/bin/env python3
"""Drives `corelm chat` in a pseudo-terminal, as a person at a terminal would, and prints the
transcript as JSON: {"turns": [{"user": ..., "assistant": ...}, ...]}.

Usage: chat_session.py COREML_BINARY PACKAGE "first message" "second message" ...
"""

import json
import os
import pty
import select
import sys
import time

PROMPT = b"you> "


def read_until(fd, marker, timeout=120.0):
    """Reads from the terminal until `marker` appears; returns what came before it."""
    buf = b""
    deadline = time.time() + timeout
    while marker not in buf:
        left = deadline - time.time()
        if left <= 0:
            raise TimeoutError(f"no {marker!r} after {timeout}s; got {buf[-400:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf.split(marker)[0]


def main():
    binary, package, *messages = sys.argv[1:]
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(binary, [binary, "chat", package, "--max-new-tokens", "48"])
    read_until(fd, PROMPT)
    turns = []
    for message in messages:
        os.write(fd, message.encode() + b"\r")
        reply = read_until(fd, PROMPT).decode(errors="replace")
        # The terminal echoes the typed line first; the reply follows "assistant> ".
        answer = reply.split("assistant> ", 1)[-1].strip()
        turns.append({"user": message, "assistant": answer})
    os.write(fd, b"/quit\r")
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"turns": turns, "exit_status": os.waitstatus_to_exitcode(status)}))


if __name__ == "__main__":
    main()
