"""A stand-in for the Hugging Face Hub on 127.0.0.1, speaking just what huggingface_hub's dataset_info and
hf_hub_download (2.x) ask for: a dataset's info at a revision (its commit sha and its files with their sizes and
LFS sha256), and HEAD and GET of resolve/<commit>/<path> with the headers the download checks (X-Repo-Commit,
ETag, Content-Length) and byte ranges. Tests point HF_ENDPOINT at it and read its request log.
"""
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


class HubServer(ThreadingHTTPServer):
    daemon_threads = False  # so server_close() joins every request's thread: a test leaves none behind

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.repos = {}  # repo id -> {"refs": {branch or tag: sha}, "commits": {sha: {path: bytes}}}
        self.log = []  # (method, repo, revision, path or None for the info), every request in order
        self.fail = set()  # paths whose GET answers 500, as a failing CDN would
        self.url = f"http://127.0.0.1:{self.server_port}"
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.02})

    def commit(self, repo: str, files: dict, refs=("main",)) -> str:
        """Add a commit of files ({path: bytes}) to repo, which refs then point to; return its sha."""
        sha = hashlib.sha1(json.dumps([repo, sorted((p, hashlib.sha256(b).hexdigest()) for p, b in files.items())])
                           .encode()).hexdigest()
        entry = self.repos.setdefault(repo, {"refs": {}, "commits": {}})
        entry["commits"][sha] = dict(files)
        entry["refs"].update({ref: sha for ref in refs})
        return sha

    def downloads(self) -> list:
        """The paths fetched (GET) so far, in order."""
        return [path for method, _, _, path in self.log if method == "GET" and path]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()
        self._thread.join()


class Handler(BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.answer(send_body=False)

    def do_GET(self):
        self.answer(send_body=True)

    def log_message(self, *args):  # the test's log is self.server.log; stderr stays quiet
        pass

    def answer(self, send_body: bool):
        # Split before unquoting: a revision such as refs/convert/parquet comes as one %2F-quoted segment.
        parts = [unquote(p) for p in urlsplit(self.path).path.split("/")[1:]]
        if parts[:2] == ["api", "datasets"] and len(parts) in (4, 6):  # /api/datasets/<repo>[/revision/<rev>]
            repo, revision, path = "/".join(parts[2:4]), parts[5] if len(parts) == 6 else "main", None
        elif parts[:1] == ["datasets"] and len(parts) > 5 and parts[3] == "resolve":
            repo, revision, path = "/".join(parts[1:3]), parts[4], "/".join(parts[5:])
        else:  # anything else huggingface_hub asks for (its agent registry, ...) is not here
            return self.reply(404, b"", {})
        self.server.log.append((self.command, repo, revision, path))
        found = self.server.repos.get(repo)
        if found is None:
            return self.reply(404, b"", {"X-Error-Code": "RepoNotFound"})
        sha = found["refs"].get(revision, revision if revision in found["commits"] else None)
        if sha is None:
            return self.reply(404, b"", {"X-Error-Code": "RevisionNotFound"})
        files = found["commits"][sha]
        if path is None:
            return self.reply(200, json.dumps(info(repo, sha, files)).encode(), {"Content-Type": "application/json"},
                              send_body)
        if path not in files:
            return self.reply(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha})
        if send_body and path in self.server.fail:
            return self.reply(500, b"", {})
        self.send_file(files[path], sha, send_body)

    def send_file(self, data: bytes, sha: str, send_body: bool):
        headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"', "Accept-Ranges": "bytes"}
        start = 0
        if self.headers.get("Range", "").startswith("bytes="):  # a resumed download asks for the rest
            start = int(self.headers["Range"][len("bytes="):].split("-")[0])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self.reply(206 if start else 200, data[start:], headers, send_body)

    def reply(self, status: int, body: bytes, headers: dict, send_body: bool = True):
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)


def info(repo: str, sha: str, files: dict) -> dict:
    """What /api/datasets/<repo>/revision/<rev>?blobs=true answers: the commit, and each file as an LFS blob."""
    return {"id": repo, "sha": sha, "siblings": [
        {"rfilename": path, "size": len(data), "blobId": hashlib.sha1(data).hexdigest(),
         "lfs": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}}
        for path, data in files.items()]}
