// The second comparison server of the benchmark: the same job as ssmtpd and
// bench/aiosmtpd_server.py, done the natural way with go-smtp 0.12 (Debian's
// golang-github-emersion-go-smtp-dev and golang-github-emersion-go-sasl-dev).
//
// STARTTLS (TLS 1.2 and newer) is required before AUTH and MAIL; AUTH PLAIN
// and LOGIN are decided by the auth program; each message goes to the process
// program's stdin after a Received: header.  Both programs get the same
// SSMTPD_* environment as under ssmtpd, run in their own session under a
// timeout (killed as a group), and their exit status is mapped to a reply by
// the same tables (ssmtpd's docs/auth-program.md "The auth program", docs/process-program.md "The process program").
//
// bench/run.py builds it once per run, in GOPATH mode from the Debian sources:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE=/tmp/gocache \
//	    go build -o /tmp/go_server ./bench/go_server
//	/tmp/go_server --port 8027 --hostname bench.test --ssl-cert cert.pem \
//	    --ssl-key key.pem --auth bench/programs/auth.sh --process bench/programs/process.sh
//
// Options not listed in main are accepted and ignored.
package main

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

const (
	exTempfail = 75
	exOSErr    = 71
)

var (
	errBadCredentials = &smtp.SMTPError{Code: 535, EnhancedCode: smtp.EnhancedCode{5, 7, 8},
		Message: "Authentication credentials invalid"}
	errTempAuth = &smtp.SMTPError{Code: 454, EnhancedCode: smtp.EnhancedCode{4, 7, 0},
		Message: "Temporary authentication failure"}
	errNeedTLS = &smtp.SMTPError{Code: 530, EnhancedCode: smtp.EnhancedCode{5, 7, 0},
		Message: "Must issue a STARTTLS command first"}
	errNeedAuth = &smtp.SMTPError{Code: 530, EnhancedCode: smtp.EnhancedCode{5, 7, 0},
		Message: "Authentication required"}
)

// Logging, as in aiosmtpd_server.py: warnings only (a program's stderr, a
// timeout, a program that cannot start); --log-level error silences them,
// info or debug adds the start-up line.
func warnf(format string, args ...interface{}) { log.Printf("WARNING "+format, args...) }

// backend holds the settings; a session is made per successful AUTH.
type backend struct {
	hostname       string
	authArgv       []string
	processArgv    []string
	authTimeout    time.Duration
	processTimeout time.Duration
}

// Login is what go-smtp's built-in PLAIN calls.  main replaces that PLAIN and
// adds LOGIN (saslFactory), so that the auth program learns the mechanism;
// Login stays for the Backend interface.
func (be *backend) Login(state *smtp.ConnectionState, username, password string) (smtp.Session, error) {
	return be.authenticate(state, "PLAIN", username, password)
}

// AnonymousLogin is asked at MAIL without AUTH: refused, with the reason.
func (be *backend) AnonymousLogin(state *smtp.ConnectionState) (smtp.Session, error) {
	if !state.TLS.HandshakeComplete {
		return nil, errNeedTLS
	}
	return nil, errNeedAuth
}

func (be *backend) authenticate(state *smtp.ConnectionState, mechanism, username, password string) (smtp.Session, error) {
	addr := clientAddr(state.RemoteAddr)
	cmd := exec.Command(be.authArgv[0], be.authArgv[1:]...)
	cmd.Env = append(os.Environ(),
		"SSMTPD_USERNAME="+username, "SSMTPD_PASSWORD="+password,
		"SSMTPD_MECHANISM="+mechanism, "SSMTPD_CLIENT_ADDR="+addr)
	status, _ := run(cmd, be.authTimeout, nil)
	switch {
	case status == 0:
		return &session{be: be, user: username, addr: addr, helo: state.Hostname,
			tls: tlsVersion(state.TLS)}, nil
	case status < 0 || status == exTempfail:
		return nil, errTempAuth
	default:
		return nil, errBadCredentials
	}
}

// saslFactory makes go-smtp's SASL servers call authenticate with the name of
// the mechanism and attach the session to the connection.
func (be *backend) saslFactory(mechanism string) smtp.SaslServerFactory {
	return func(conn *smtp.Conn) sasl.Server {
		check := func(username, password string) error {
			state := conn.State()
			s, err := be.authenticate(&state, mechanism, username, password)
			if err == nil {
				conn.SetSession(s)
			}
			return err
		}
		if mechanism == sasl.Login {
			return sasl.NewLoginServer(check)
		}
		return sasl.NewPlainServer(func(identity, username, password string) error {
			if identity != "" && identity != username {
				return errBadCredentials
			}
			return check(username, password)
		})
	}
}

// session is one authenticated client's transaction state.
type session struct {
	be                    *backend
	user, addr, helo, tls string
	from                  string
	rcpts                 []string
}

func (s *session) Reset()        { s.from, s.rcpts = "", nil }
func (s *session) Logout() error { return nil }

func (s *session) Mail(from string, opts smtp.MailOptions) error {
	s.from, s.rcpts = from, nil
	return nil
}

func (s *session) Rcpt(to string) error {
	s.rcpts = append(s.rcpts, to)
	return nil
}

// Data streams the Received: header and the message to the process program.
func (s *session) Data(r io.Reader) error {
	be := s.be
	argv := append(append([]string{}, be.processArgv[1:]...), s.user)
	cmd := exec.Command(be.processArgv[0], argv...)
	cmd.Env = append(os.Environ(),
		"SSMTPD_USERNAME="+s.user, "SSMTPD_MAIL_FROM="+s.from,
		"SSMTPD_RCPT_TO="+strings.Join(s.rcpts, "\n"), "SSMTPD_CLIENT_ADDR="+s.addr,
		"SSMTPD_HELO="+s.helo, "SSMTPD_TLS="+s.tls)
	literal := "[" + s.addr + "]"
	if strings.Contains(s.addr, ":") {
		literal = "[IPv6:" + s.addr + "]"
	}
	with := "ESMTP"
	if s.tls != "" {
		with += "S"
	}
	if s.user != "" {
		with += "A"
	}
	received := fmt.Sprintf("Received: from %s (%s)\r\n\tby %s (go-smtp) with %s;\r\n\t%s\r\n",
		s.helo, literal, be.hostname, with, time.Now().Format(time.RFC1123Z))

	var readErr error
	status, out := run(cmd, be.processTimeout, func(stdin io.Writer) {
		w := bufio.NewWriterSize(stdin, 64*1024)
		w.WriteString(received)
		readErr = copyCRLF(w, r)
		w.Flush()
	})
	if readErr != nil { // over the size limit or the client went away: never accepted
		return readErr
	}
	text := lastLine(out)
	switch {
	case status == 0:
		return &smtp.SMTPError{Code: 250, EnhancedCode: smtp.EnhancedCode{2, 0, 0},
			Message: orDefault(text, "Ok: message accepted")}
	case status < 0 || status == exTempfail || status == exOSErr:
		return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0},
			Message: orDefault(text, "Try again later")}
	default:
		return &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 3, 0},
			Message: orDefault(text, "Message rejected")}
	}
}

// copyCRLF copies the message as the client sent it: go-smtp's DATA reader
// (net/textproto's DotReader) turns each CRLF into LF, the programs get CRLF.
// Write errors (the program did not read it all) are ignored, its exit decides;
// read errors are returned after the rest has been passed on or dropped.
func copyCRLF(w *bufio.Writer, r io.Reader) error {
	buf := make([]byte, 32*1024)
	var werr error
	for {
		n, err := r.Read(buf)
		chunk := buf[:n]
		for werr == nil && len(chunk) > 0 {
			i := bytes.IndexByte(chunk, '\n')
			if i < 0 {
				_, werr = w.Write(chunk)
				break
			}
			if _, werr = w.Write(chunk[:i]); werr == nil {
				_, werr = w.WriteString("\r\n")
			}
			chunk = chunk[i+1:]
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// run starts cmd in its own session with stdout and stderr captured, feeds
// stdin with feed (nil: /dev/null), and waits, killing the whole process group
// after timeout.  It returns the exit status (-1: killed by a signal, timed out
// or could not start) and stdout.
func run(cmd *exec.Cmd, timeout time.Duration, feed func(io.Writer)) (int, []byte) {
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	var stdin io.WriteCloser
	var err error
	if feed != nil {
		stdin, err = cmd.StdinPipe()
	}
	if err == nil {
		err = cmd.Start()
	}
	if err != nil {
		warnf("%s: cannot start: %v", cmd.Path, err)
		if feed != nil {
			feed(io.Discard) // the message is read all the same
		}
		return -1, nil
	}
	pid := cmd.Process.Pid
	timer := time.AfterFunc(timeout, func() { syscall.Kill(-pid, syscall.SIGKILL) })
	if feed != nil {
		feed(stdin)
		stdin.Close()
	}
	err = cmd.Wait()
	timedOut := !timer.Stop()
	for _, line := range strings.Split(strings.TrimRight(errOut.String(), "\n"), "\n") {
		if line != "" {
			warnf("%s stderr: %.1000s", cmd.Path, line)
		}
	}
	if timedOut {
		warnf("%s: timed out, killed", cmd.Path)
		return -1, nil
	}
	var exitErr *exec.ExitError
	if err != nil && !errors.As(err, &exitErr) {
		warnf("%s: %v", cmd.Path, err)
		return -1, nil
	}
	return cmd.ProcessState.ExitCode(), out.Bytes() // ExitCode is -1 after a signal
}

// lastLine is the program's last non-empty stdout line, printable ASCII only,
// cut at 200 characters.
func lastLine(out []byte) string {
	lines := bytes.Split(out, []byte("\n"))
	for i := len(lines) - 1; i >= 0; i-- {
		var b strings.Builder
		for _, c := range lines[i] {
			if c >= 32 && c < 127 {
				b.WriteByte(c)
			}
		}
		if text := strings.TrimSpace(b.String()); text != "" {
			if len(text) > 200 {
				text = text[:200]
			}
			return text
		}
	}
	return ""
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

func clientAddr(a net.Addr) string {
	if tcp, ok := a.(*net.TCPAddr); ok {
		return tcp.IP.String()
	}
	return a.String()
}

func tlsVersion(state tls.ConnectionState) string {
	if !state.HandshakeComplete {
		return ""
	}
	switch state.Version {
	case tls.VersionTLS12:
		return "TLSv1.2"
	case tls.VersionTLS13:
		return "TLSv1.3"
	}
	return fmt.Sprintf("TLS 0x%04x", state.Version)
}

// knownFlags drops the options this server does not define (and a separate
// value after one), so that a runner may pass options meant for another server.
func knownFlags(fs *flag.FlagSet, args []string) []string {
	var keep []string
	for i := 0; i < len(args); i++ {
		name := strings.TrimLeft(args[i], "-")
		if !strings.HasPrefix(args[i], "-") || name == "" {
			keep = append(keep, args[i])
			continue
		}
		if j := strings.IndexByte(name, '='); j >= 0 {
			name = name[:j]
		}
		if fs.Lookup(name) != nil {
			keep = append(keep, args[i])
		} else if !strings.Contains(args[i], "=") && i+1 < len(args) &&
			!strings.HasPrefix(args[i+1], "-") {
			i++ // its value
		}
	}
	return keep
}

func main() {
	fs := flag.NewFlagSet("go_server", flag.ExitOnError)
	bind := fs.String("bind", "127.0.0.1", "address to listen on")
	port := fs.Int("port", 8027, "port to listen on")
	hostname := fs.String("hostname", "bench.test", "name in the greeting and Received:")
	certFile := fs.String("ssl-cert", "", "certificate (PEM)")
	keyFile := fs.String("ssl-key", "", "private key (PEM)")
	authProg := fs.String("auth", "", "auth program (split on spaces, no quoting)")
	processProg := fs.String("process", "", "process program (split on spaces, no quoting)")
	authTimeout := fs.Float64("auth-timeout", 30, "seconds")
	processTimeout := fs.Float64("process-timeout", 300, "seconds")
	idleTimeout := fs.Float64("timeout", 300, "seconds a client may stay silent")
	maxSize := fs.Int("max-message-size", 26214400, "octets")
	logLevel := fs.String("log-level", "warning", "debug, info, warning or error")
	fs.Parse(knownFlags(fs, os.Args[1:]))

	if *logLevel == "error" {
		log.SetOutput(io.Discard) // warnings are all this server logs
	}
	if *certFile == "" || *keyFile == "" || *authProg == "" || *processProg == "" {
		log.SetOutput(os.Stderr)
		log.Fatal("--ssl-cert, --ssl-key, --auth and --process are required")
	}
	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		log.Fatal(err)
	}
	seconds := func(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }
	be := &backend{hostname: *hostname, authArgv: strings.Fields(*authProg),
		processArgv: strings.Fields(*processProg), authTimeout: seconds(*authTimeout),
		processTimeout: seconds(*processTimeout)}

	s := smtp.NewServer(be)
	s.Addr = net.JoinHostPort(*bind, fmt.Sprint(*port))
	s.Domain = *hostname
	// Go servers never renegotiate; MinVersion is the rest of ssmtpd's policy.
	s.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	s.AllowInsecureAuth = false // no AUTH (523) and no AUTH offered before STARTTLS
	s.MaxMessageBytes = *maxSize
	s.EnableSMTPUTF8 = true
	s.ReadTimeout = seconds(*idleTimeout)
	s.WriteTimeout = seconds(*idleTimeout)
	s.EnableAuth(sasl.Plain, be.saslFactory(sasl.Plain))
	s.EnableAuth(sasl.Login, be.saslFactory(sasl.Login))

	l, err := net.Listen("tcp", s.Addr)
	if err != nil {
		log.Fatal(err)
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-stop
		s.Close() // closes the listener and every connection
	}()
	if *logLevel == "debug" || *logLevel == "info" {
		log.Printf("INFO listening on %s", s.Addr)
	}
	if err := s.Serve(l); err != nil {
		log.Fatal(err)
	}
}
