# Multi-stage build of a small image that runs `dstl serve`.
#   docker build -t dstl .
#   docker run -p 7600:7600 -v dstl-data:/data dstl
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# The same build script CI runs (scripts/test.sh calls it too).
RUN OUT=/out/dstl VERSION=docker ./scripts/build.sh && mkdir -p /out/data

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/dstl /usr/local/bin/dstl
# The data volume must be writable by the image's nonroot user (65532).
COPY --from=build --chown=65532:65532 /out/data /data
VOLUME /data
WORKDIR /data
EXPOSE 7600
ENTRYPOINT ["/usr/local/bin/dstl"]
CMD ["serve", "--listen", "0.0.0.0:7600", "--data-dir", "/data"]
