"""A real SMTP server for the daemon's integration tests.

Started by tests/daemon/harness/smtp.rs as

    python3 smtp_sink.py --port PORT --maildir DIR [--refuse-file F] [--recipients-file R]

It listens on 127.0.0.1:PORT with aiosmtpd and writes every accepted message to
DIR as one JSON file {"mail_from", "rcpt_to", "data"}. A file appears under its
final name (write to a temporary name, then rename) before the server answers
250 to DATA, so a client that saw its message accepted finds it on disk.

Recipients are refused on purpose so tests can exercise failures:
  - an address containing "bounce"   gets 550 5.1.1 user unknown (permanent);
  - an address containing "tempfail" gets 451 4.3.0 try again later (transient);
  - a message to an address containing "dropafterdata" is stored, and then the
    connection is dropped instead of answering DATA: the client cannot know the
    message was accepted;
  - while the file named by --refuse-file exists, every recipient gets its first
    line as the reply (e.g. "554 5.7.1 rejected by policy"), whatever the address;
  - while the file named by --recipients-file exists, a recipient it lists gets its
    reply: one "address<TAB>reply" per line (e.g. "ann@example.com\t550 5.7.1 rejected
    by policy"), addresses compared case-insensitively.

When the server listens it prints "READY <port>" on stdout. It stops on SIGTERM
or SIGKILL, and also when its stdin closes, so it never outlives the test
process that started it.
"""

import argparse
import itertools
import json
import os
import sys
import time

from aiosmtpd.controller import Controller


class SinkHandler:
    def __init__(self, maildir, refuse_file, recipients_file):
        self.maildir = maildir
        self.refuse_file = refuse_file
        self.recipients_file = recipients_file
        self.sequence = itertools.count()

    def refusal(self):
        if not self.refuse_file:
            return None
        try:
            with open(self.refuse_file, encoding="utf-8") as file:
                return file.readline().strip() or None
        except FileNotFoundError:
            return None

    def recipient_refusal(self, lowered):
        if not self.recipients_file:
            return None
        try:
            with open(self.recipients_file, encoding="utf-8") as file:
                for line in file:
                    address, _, reply = line.rstrip("\n").partition("\t")
                    if address.strip().lower() == lowered and reply.strip():
                        return reply.strip()
        except FileNotFoundError:
            pass
        return None

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        refusal = self.refusal()
        if refusal:
            return refusal
        lowered = address.lower()
        refusal = self.recipient_refusal(lowered)
        if refusal:
            return refusal
        if "bounce" in lowered:
            return "550 5.1.1 user unknown"
        if "tempfail" in lowered:
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        content = envelope.original_content or envelope.content or b""
        if isinstance(content, str):
            data = content
        else:
            data = content.decode("utf-8", errors="replace")
        message = {
            "mail_from": envelope.mail_from,
            "rcpt_to": list(envelope.rcpt_tos),
            "data": data,
        }
        # Names sort in arrival order, also across restarts of the sink on one directory.
        name = f"{time.time_ns():020d}-{os.getpid()}-{next(self.sequence):06d}.json"
        temporary = os.path.join(self.maildir, "." + name + ".tmp")
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(message, file)
        os.rename(temporary, os.path.join(self.maildir, name))
        if any("dropafterdata" in rcpt.lower() for rcpt in envelope.rcpt_tos):
            server.transport.abort()
        return "250 Message accepted for delivery"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--maildir", required=True)
    parser.add_argument("--refuse-file")
    parser.add_argument("--recipients-file")
    args = parser.parse_args()

    controller = Controller(
        SinkHandler(args.maildir, args.refuse_file, args.recipients_file),
        hostname=args.host,
        port=args.port,
        # A fixed greeting name: the default looks up the machine's FQDN, which can hang.
        server_hostname="smtp-sink.test",
        enable_SMTPUTF8=True,
    )
    controller.start()
    print(f"READY {args.port}", flush=True)
    try:
        # Blocks until the parent closes our stdin or exits.
        sys.stdin.read()
    except KeyboardInterrupt:
        pass
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
