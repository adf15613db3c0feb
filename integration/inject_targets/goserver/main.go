// Injection target: a static Go net/http server on two ports (netpoll with
// EPOLLET, many threads, SIGURG preemption). Prints "MAIN_PORT AUX_PORT".
package main

import (
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
)

func main() {
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Connection", "close")
		fmt.Fprint(w, "ok\n")
	})
	var ports []int
	for i := 0; i < 2; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			log.Fatal(err)
		}
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
		go func() { log.Fatal(http.Serve(l, handler)) }()
	}
	fmt.Fprintf(os.Stdout, "%d %d\n", ports[0], ports[1])
	select {}
}
