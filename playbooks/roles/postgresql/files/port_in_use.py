"""Check that the server can bind its port on every listen address.

Usage: port_in_use.py PORT ADDRESS[,ADDRESS...] [ignore-in-use]

Prints one line naming the problem and the fix, and exits 1, for the first
address it cannot bind: a port another process holds, an address the host does
not have, or a port below 1024 without root. With ignore-in-use, a port that is
held passes: the server already runs there and only the addresses are checked.
"""
import errno
import socket
import sys


def problem(port, address, error):
    if error.errno == errno.EADDRINUSE:
        return (f"port {port} on {address} is already in use by another process; "
                "set postgresql_port to a free port")
    if error.errno == errno.EADDRNOTAVAIL:
        return (f"listen address {address} is not an address of this host; "
                "set postgresql_listen_addresses to addresses the host has")
    if error.errno == errno.EACCES:
        return f"port {port} on {address} needs root to bind; set postgresql_port to a port above 1023"
    return f"cannot bind port {port} on {address}: {error.strerror}; check postgresql_port and postgresql_listen_addresses"


def main():
    port = int(sys.argv[1])
    ignore_in_use = sys.argv[3:] == ["ignore-in-use"]
    for address in sys.argv[2].split(","):
        address = address.strip()
        host = None if address in ("*", "") else address
        try:
            candidates = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as error:
            print(f"listen address {address} cannot be resolved ({error.strerror}); "
                  "set postgresql_listen_addresses to addresses the host has")
            return 1
        for family, _, _, _, sockaddr in candidates:
            probe = socket.socket(family, socket.SOCK_STREAM)
            # SO_REUSEADDR lets sockets in TIME_WAIT pass, as they do for the server.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as error:
                if ignore_in_use and error.errno == errno.EADDRINUSE:
                    continue
                print(problem(port, address or "*", error))
                return 1
            finally:
                probe.close()
    return 0


sys.exit(main())
