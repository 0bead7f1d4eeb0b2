package e2e

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/internal/toolbin"

	"github.com/dstl-dev/dstl/changelog/keygroup"
)

const grpcurlModule = "github.com/fullstorydev/grpcurl"

// TestGRPCurl drives the node with a stock gRPC client, grpcurl: server
// reflection lists and describes the services, JSON requests create a
// stream, open a writer, append and read back, errors carry their gRPC
// status, and the standard health service answers SERVING.
func TestGRPCurl(t *testing.T) {
	t.Parallel()
	bin := grpcurlBinary(t)
	n := startNode(t, "node", nodeConfig{dataDir: t.TempDir()})
	run := func(args ...string) (string, string, error) {
		t.Helper()
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, bin, append([]string{"-plaintext"}, args...)...)
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		return stdout.String(), stderr.String(), err
	}
	ok := func(args ...string) string {
		t.Helper()
		out, errOut, err := run(args...)
		if err != nil {
			t.Fatalf("grpcurl %s: %v\nstdout: %s\nstderr: %s", strings.Join(args, " "), err, out, errOut)
		}
		return out
	}
	call := func(method, body string) map[string]any {
		t.Helper()
		out := ok("-d", body, n.Addr, method)
		var m map[string]any
		if err := json.Unmarshal([]byte(out), &m); err != nil {
			t.Fatalf("grpcurl %s: output is not one JSON object: %v\n%s", method, err, out)
		}
		return m
	}

	// Reflection: list and describe.
	list := ok(n.Addr, "list")
	for _, svc := range []string{
		"dstl.v1.StreamService", "dstl.v1.WriterService", "dstl.v1.StateService",
		"dstl.v1.CheckpointService", "dstl.v1.ClusterService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
	} {
		if !containsLine(list, svc) {
			t.Errorf("grpcurl list: no %s in\n%s", svc, list)
		}
	}
	if desc := ok(n.Addr, "describe", "grpc.health.v1.Health"); !strings.Contains(desc, "rpc Check ( .grpc.health.v1.HealthCheckRequest )") {
		t.Errorf("grpcurl describe grpc.health.v1.Health:\n%s", desc)
	}
	methods := ok(n.Addr, "list", "dstl.v1.WriterService")
	for _, m := range []string{"OpenWriter", "Append", "AppendStream", "Persist", "Checkpoint", "CloseWriter"} {
		if !containsLine(methods, "dstl.v1.WriterService."+m) {
			t.Errorf("grpcurl list dstl.v1.WriterService: no %s in\n%s", m, methods)
		}
	}
	desc := ok(n.Addr, "describe", "dstl.v1.WriterService.Append")
	if !strings.Contains(desc, "rpc Append ( .dstl.v1.AppendRequest ) returns ( .dstl.v1.AppendResponse )") {
		t.Errorf("grpcurl describe dstl.v1.WriterService.Append:\n%s", desc)
	}
	desc = ok(n.Addr, "describe", "dstl.v1.Change")
	for _, f := range []string{"uint32 key_group = 1;", "string state = 2;", ".dstl.v1.Op op = 3;", "bytes key = 4;", "bytes value = 5;"} {
		if !strings.Contains(desc, f) {
			t.Errorf("grpcurl describe dstl.v1.Change: no %q in\n%s", f, desc)
		}
	}

	// Health: the server as a whole and each service.
	for _, svc := range []string{"", "dstl.v1.WriterService", "dstl.v1.StateService"} {
		h := call("grpc.health.v1.Health/Check", fmt.Sprintf(`{"service":%q}`, svc))
		if h["status"] != "SERVING" {
			t.Errorf("Health/Check %q: %v, want SERVING", svc, h)
		}
	}

	// A stream, a writer, an append, a read.
	s := call("dstl.v1.StreamService/CreateStream", `{"name":"grpcurl","keyGroups":8}`)
	if st, _ := s["stream"].(map[string]any); st["name"] != "grpcurl" || st["keyGroups"] != float64(8) {
		t.Fatalf("CreateStream: %v", s)
	}
	_, errOut, err := run("-d", `{"name":"grpcurl"}`, n.Addr, "dstl.v1.StreamService/CreateStream")
	if err == nil || !strings.Contains(errOut, "AlreadyExists") {
		t.Errorf("CreateStream of an existing name: err %v, stderr %q; want code AlreadyExists", err, errOut)
	}
	w := call("dstl.v1.WriterService/OpenWriter", `{"stream":"grpcurl"}`)
	writer, _ := w["writerId"].(string)
	if writer == "" {
		t.Fatalf("OpenWriter: %v", w)
	}
	key := "user-42"
	b64 := base64.StdEncoding.EncodeToString
	a := call("dstl.v1.WriterService/Append", fmt.Sprintf(
		`{"writerId":%q,"durability":"DURABILITY_LOCAL","changes":[{"keyGroup":%d,"state":"profile","op":"OP_PUT","key":%q,"value":%q}]}`,
		writer, keygroup.OfString(key, 8), b64([]byte(key)), b64([]byte("hello grpcurl"))))
	if a["firstSqn"] != "1" || a["lastSqn"] != "1" { // uint64 is a JSON string
		t.Errorf("Append: %v, want SQNs 1..1", a)
	}
	g := call("dstl.v1.StateService/Get", fmt.Sprintf(`{"stream":"grpcurl","state":"profile","key":%q}`, b64([]byte(key))))
	if g["found"] != true || g["value"] != b64([]byte("hello grpcurl")) {
		t.Errorf("Get: %v", g)
	}
	_, errOut, err = run("-d", fmt.Sprintf(`{"writerId":%q,"changes":[{"keyGroup":9,"state":"s","op":"OP_PUT","key":"YQ=="}]}`, writer),
		n.Addr, "dstl.v1.WriterService/Append")
	if err == nil || !strings.Contains(errOut, "InvalidArgument") {
		t.Errorf("Append to key group 9 of 8: err %v, stderr %q; want code InvalidArgument", err, errOut)
	}
	p := call("dstl.v1.WriterService/Persist", fmt.Sprintf(`{"writerId":%q}`, writer))
	if p["upToSqn"] != "1" {
		t.Errorf("Persist: %v", p)
	}
}

func containsLine(out, line string) bool {
	for l := range strings.Lines(out) {
		if strings.TrimSpace(l) == line {
			return true
		}
	}
	return false
}

var grpcurlOnce struct {
	sync.Mutex
	bin string
}

// grpcurlBinary returns the grpcurl binary pinned in tools/grpcurl/go.mod,
// building it once per machine into the user cache directory
// (os.UserCacheDir()/dstl/grpcurl-<version>/grpcurl) under a file lock
// (internal/toolbin). A cold build takes about a minute.
func grpcurlBinary(t *testing.T) string {
	t.Helper()
	grpcurlOnce.Lock()
	defer grpcurlOnce.Unlock()
	if grpcurlOnce.bin != "" {
		return grpcurlOnce.bin
	}
	bin, err := toolbin.Build(t.Context(), toolbin.Tool{Name: "grpcurl", ToolsDir: "tools/grpcurl", Module: grpcurlModule, Package: grpcurlModule + "/cmd/grpcurl"}, t.Logf)
	if err != nil {
		t.Fatalf("grpcurl: %v", err)
	}
	grpcurlOnce.bin = bin
	return bin
}
