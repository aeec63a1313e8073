// Command nettool is the networking tests' helper inside sandboxes, where
// busybox has no UDP client, no WebSocket and no server that never
// answers: a static binary the tests add to their image.
//
//	nettool http :PORT TEXT     answer every request with TEXT and the path
//	nettool ws-echo :PORT       a WebSocket echo server
//	nettool udp-echo :PORT      send every datagram back
//	nettool udp ADDR MSG        send MSG, print the reply (exit 1 after 2 s)
//	nettool slow :PORT          accept connections and never answer
package main

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/coder/websocket"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: nettool http|ws-echo|udp-echo|udp|slow ARGS")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Args[2:]); err != nil {
		fmt.Fprintln(os.Stderr, "nettool:", err)
		os.Exit(1)
	}
}

func run(cmd string, args []string) error {
	switch cmd {
	case "http":
		text := args[1]
		return http.ListenAndServe(args[0], http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "%s %s\n", text, r.URL.Path)
		}))
	case "ws-echo":
		return http.ListenAndServe(args[0], http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			c, err := websocket.Accept(w, r, nil)
			if err != nil {
				return
			}
			defer c.CloseNow()
			for {
				t, b, err := c.Read(r.Context())
				if err != nil {
					return
				}
				if err := c.Write(r.Context(), t, b); err != nil {
					return
				}
			}
		}))
	case "udp-echo":
		pc, err := net.ListenPacket("udp", args[0])
		if err != nil {
			return err
		}
		b := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFrom(b)
			if err != nil {
				return err
			}
			_, _ = pc.WriteTo(b[:n], from)
		}
	case "udp":
		c, err := net.Dial("udp", args[0])
		if err != nil {
			return err
		}
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Write([]byte(args[1])); err != nil {
			return err
		}
		b := make([]byte, 65536)
		n, err := c.Read(b)
		if err != nil {
			return err
		}
		fmt.Println(string(b[:n]))
		return nil
	case "slow":
		ln, err := net.Listen("tcp", args[0])
		if err != nil {
			return err
		}
		var held []net.Conn
		for {
			c, err := ln.Accept()
			if err != nil {
				return err
			}
			held = append(held, c)
		}
	}
	return fmt.Errorf("unknown command %q", cmd)
}
