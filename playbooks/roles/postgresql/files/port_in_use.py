"""Print the first listen address whose TCP port another process holds, and exit 1.

Usage: port_in_use.py PORT ADDRESS[,ADDRESS...]
"""
import socket
import sys


def main():
    port = int(sys.argv[1])
    for address in sys.argv[2].split(","):
        address = address.strip()
        host = None if address in ("*", "") else address
        for family, _, _, _, sockaddr in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            probe = socket.socket(family, socket.SOCK_STREAM)
            # SO_REUSEADDR lets sockets in TIME_WAIT pass, as they do for the server.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError:
                print(address or "*")
                return 1
            finally:
                probe.close()
    return 0


sys.exit(main())
