// A datagram echo server in Go, built static by the tests (CGO_ENABLED=0):
// the same protocol as udp_echo_server.py. Every datagram is answered, to its
// sender, with the datagram followed by " PID". Go's runtime reads the socket
// through its netpoller (epoll, edge-triggered, O_NONBLOCK), which is what the
// pause must cope with.
//
// Usage: udpgo udp:HOST:PORT | udp:[V6]:PORT | unixgram:PATH
// SIGTERM/SIGINT: answer the datagram in hand, then exit.
package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

func listen(arg string) (net.PacketConn, string, error) {
	if strings.HasPrefix(arg, "unixgram:") {
		path := strings.TrimPrefix(arg, "unixgram:")
		if st, err := os.Lstat(path); err == nil && st.Mode()&os.ModeSocket != 0 {
			os.Remove(path)
		}
		c, err := net.ListenPacket("unixgram", path)
		return c, path, err
	}
	if !strings.HasPrefix(arg, "udp:") {
		return nil, "", fmt.Errorf("not an address: %q", arg)
	}
	addr := strings.TrimPrefix(arg, "udp:")
	network := "udp4"
	if strings.HasPrefix(addr, "[") {
		network = "udp6"
	}
	c, err := net.ListenPacket(network, addr)
	return c, "", err
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: udpgo ADDRESS")
		os.Exit(2)
	}
	conn, path, err := listen(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	pid := os.Getpid()
	fmt.Printf("udp_echo_server %d bound %s\n", pid, os.Args[1])
	var stopping atomic.Bool
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sigs
		stopping.Store(true)
		conn.SetReadDeadline(time.Now()) // wakes the reader; a datagram in hand is answered
	}()
	suffix := []byte(fmt.Sprintf(" %d", pid))
	buf := make([]byte, 65536)
	answered := 0
	for !stopping.Load() {
		n, peer, err := conn.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				continue
			}
			fmt.Fprintln(os.Stderr, "read:", err)
			break
		}
		if _, err := conn.WriteTo(append(buf[:n:n], suffix...), peer); err != nil {
			fmt.Printf("udp_echo_server %d: write to %v: %v\n", pid, peer, err)
			continue
		}
		answered++
	}
	fmt.Printf("udp_echo_server %d answered %d\n", pid, answered)
	if path != "" {
		os.Remove(path)
	}
}
