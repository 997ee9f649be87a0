"""`python tests/tcp_relay.py HOST PORT`: pipe stdin/stdout to a TCP connection.

Used as the cluster launcher's `auth.ssh_proxy_command` in tests/test_cluster.py, so `ray up` reaches the test's
own sshd on a free port of 127.0.0.1 (Ray's SSH settings have no port option) without netcat.
"""

import os
import socket
import sys
import threading


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    connection = socket.create_connection((host, port))

    def upstream() -> None:
        while data := os.read(0, 65536):
            connection.sendall(data)
        connection.shutdown(socket.SHUT_WR)

    threading.Thread(target=upstream, daemon=True).start()
    while data := connection.recv(65536):
        os.write(1, data)


if __name__ == "__main__":
    main()
