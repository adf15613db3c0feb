// goserver is the static Go test server for hupt's integration tests.
//
// It exists because Go binaries are the case LD_PRELOAD tools cannot handle:
// built with CGO_ENABLED=0 it has no ELF interpreter, makes raw syscalls,
// probes IPv6 with port-0 binds at start, runs many threads and gets SIGURG
// preemption signals. It uses only net/http so that what hupt sees is what
// ordinary Go servers do.
//
// Usage: goserver ADDRESS, where ADDRESS is "127.0.0.1:PORT", "[::1]:PORT"
// or "unix:/path". Routes:
//
//	/           "ok pid=<pid> tag=<$HUPT_TEST_TAG>\n"
//	/pid        "<pid>\n"
//	/slow?ms=N  sleeps N ms, then answers like "/"
//
// SIGTERM/SIGINT: http.Server.Shutdown (stop accepting, wait for in-flight
// requests, close idle keep-alive connections), then exit 0.
package main

import (
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// maxSlow bounds /slow so a typo in a test cannot pin a generation for hours.
const maxSlow = 10 * time.Minute

func listen(address string) (net.Listener, error) {
	// strings.CutPrefix is Go 1.20; CI's golang-go may be 1.19.
	if strings.HasPrefix(address, "unix:") {
		return net.Listen("unix", strings.TrimPrefix(address, "unix:"))
	}
	return net.Listen("tcp", address)
}

func okBody() string {
	return fmt.Sprintf("ok pid=%d tag=%s\n", os.Getpid(), os.Getenv("HUPT_TEST_TAG"))
}

func routes() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		io.WriteString(w, okBody())
	})
	mux.HandleFunc("/pid", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%d\n", os.Getpid())
	})
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		ms, err := strconv.Atoi(r.URL.Query().Get("ms"))
		if err != nil || ms < 0 {
			http.Error(w, "bad ms\n", http.StatusBadRequest)
			return
		}
		d := time.Duration(ms) * time.Millisecond
		if d > maxSlow {
			d = maxSlow
		}
		time.Sleep(d)
		io.WriteString(w, okBody())
	})
	return mux
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: goserver 127.0.0.1:PORT | [::1]:PORT | unix:/path")
		os.Exit(2)
	}
	ln, err := listen(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, "goserver:", err)
		os.Exit(1)
	}
	srv := &http.Server{Handler: routes(), ErrorLog: log.New(io.Discard, "", 0)}

	done := make(chan struct{})
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sigs
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			fmt.Fprintln(os.Stderr, "goserver: shutdown:", err)
		}
		close(done)
	}()

	fmt.Fprintf(os.Stderr, "goserver pid=%d listening on %s\n", os.Getpid(), ln.Addr())
	if err := srv.Serve(ln); err != http.ErrServerClosed {
		fmt.Fprintln(os.Stderr, "goserver: serve:", err)
		os.Exit(1)
	}
	<-done
}
